"""``softprompt serve``: every prompt in a folder over HTTP from one frozen model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .common import MODEL_HELP, _device, _fail, app


# ----------------------------------------------------------------------------- serve
@app.command("serve")
def serve_cmd(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    prompts: Path = typer.Option(Path("prompts"), help="Folder of prompt artifacts: <task>.safetensors, or a subfolder (ensemble)."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    token: Optional[str] = typer.Option(None, help="Bearer token for admin endpoints (or SOFTPROMPT_SERVE_TOKEN)."),
    max_batch_size: int = typer.Option(32, help="Largest batch the dynamic batcher forms."),
    max_wait_ms: float = typer.Option(5.0, help="Longest a request waits for batch-mates."),
    protect_reads: bool = typer.Option(False, help="Require the token for every endpoint but /healthz (docs and schema too)."),
    max_queue: int = typer.Option(1024, help="Rows (inputs x ensemble members) queued at most; beyond: 503 + Retry-After."),
    max_inputs: int = typer.Option(64, help="Inputs per request at most; beyond: 422."),
    max_input_tokens: int = typer.Option(512, help="Tokens per input after the template at most; beyond: 422."),
    max_new_tokens: int = typer.Option(256, help="Largest max_new_tokens / max_tokens a request may ask for; beyond: 422."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest JSON request body; beyond: 413."),
    max_upload_bytes: int = typer.Option(8 << 20, help="Largest prompt upload (PUT /v1/tasks/NAME); beyond: 413."),
    max_concurrent_uploads: int = typer.Option(2, help="Uploads received at once; beyond: 429 + Retry-After."),
    max_concurrent_requests: int = typer.Option(256, help="Requests with a body in flight at once; beyond: 503 + Retry-After."),
    header_timeout: float = typer.Option(10.0, help="Seconds a request head may take (from the connection's start or the previous answer); beyond: the connection is closed (with a 408 when part of a head came)."),
    body_timeout: float = typer.Option(10.0, help="Seconds a request body may go without a byte; beyond: 408 + Connection: close."),
    min_body_rate: float = typer.Option(1024.0, help="Bytes/s a body must average once it has taken --body-timeout seconds (0: no minimum); beyond: 408."),
    max_connections: int = typer.Option(1000, help="Connections served at once; requests on more get 503 (memory stays below connections x --max-body-bytes)."),
    max_batch_tokens: int = typer.Option(8192, help="Tokens per forward pass (rows x (prompt + input [+ new tokens])); bounds scoring memory."),
    max_labels: int = typer.Option(100, help="Most labels a classification prompt may have; more is refused (422) at upload and load."),
    max_label_tokens: int = typer.Option(16, help="Most tokens per label word; longer words are refused at upload and load."),
    max_template_tokens: int = typer.Option(1024, help="Most tokens in a prompt's fixed prefix (template head); longer is refused."),
    max_tasks: int = typer.Option(256, help="Most tasks served at once; another is refused (422 too_many_tasks; from the folder: reported by reload)."),
    max_prefix_cache_mb: int = typer.Option(2048, help="MiB of cached template-head key/values all tasks may hold; beyond: 422 prefix_memory_full."),
    max_response_bytes: int = typer.Option(16 << 20, help="Largest classify answer (estimated from inputs x labels x label names, ensemble members' maps included); beyond: 422 before any work."),
    backend: str = typer.Option("engine", help="engine: the in-process batching engine (default). vllm: send every "
                                "forward pass to vLLM as input embeddings (prompt/P-tuning prompts; prefix-tuned ones "
                                "are refused): vLLM's engine in this process (needs vllm installed, e.g. .venv-vllm "
                                "from `make setup-vllm`), or the servers given with --vllm-url."),
    vllm_url: Optional[list[str]] = typer.Option(None, "--vllm-url", help="With --backend vllm: base URL of a vLLM "
                                                 "OpenAI server started with --enable-prompt-embeds (repeat for "
                                                 "replicas: least-loaded first, health-checked; API key from "
                                                 "SOFTPROMPT_VLLM_API_KEY). None: vLLM runs in this process."),
    vllm_max_model_len: Optional[int] = typer.Option(None, help="In-process vLLM: context length to reserve KV cache for (default: the model's)."),
    vllm_eager: bool = typer.Option(False, help="In-process vLLM: skip torch.compile (starts in seconds instead of minutes on a small CPU; slower per token)."),
    vllm_tensor_parallel_size: int = typer.Option(1, help="In-process vLLM: shard the model over this many GPUs (tensor parallelism)."),
):
    """Serve every prompt in a folder from ONE frozen model over HTTP (FastAPI; docs at /docs).

    One server per prompts folder (it holds a lock on it); see README, "Limits and guarantees".
    With --backend vllm the HTTP API, prompt folder, model checks and hot swap are the same,
    and vLLM (in this process, or N replicas behind --vllm-url) runs the model."""
    from ..families import UnsupportedError
    from ..serve import TOKEN_ENV_VAR, EngineConfig, FolderLock, FolderLockedError, serve
    from ..serve.backends import BACKENDS

    if not prompts.is_dir():
        _fail(f"prompt folder {prompts} does not exist; create it and put <task>.safetensors files in it")
    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if vllm_url and backend != "vllm":
        _fail("--vllm-url needs --backend vllm")
    from ..serve.connection import http_limits_problem

    why = http_limits_problem(header_timeout, body_timeout, min_body_rate, max_connections)
    if why is not None:
        _fail(why)
    if protect_reads and not (token or os.environ.get(TOKEN_ENV_VAR)):
        _fail(f"--protect-reads needs a token: give --token or set ${TOKEN_ENV_VAR}")
    try:
        config = EngineConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                              max_input_tokens=max_input_tokens, max_new_tokens_limit=max_new_tokens,
                              max_batch_tokens=max_batch_tokens, max_labels=max_labels,
                              max_label_tokens=max_label_tokens, max_template_tokens=max_template_tokens,
                              max_tasks=max_tasks, max_prefix_cache_bytes=max_prefix_cache_mb << 20,
                              max_response_bytes=max_response_bytes)
    except ValueError as e:
        _fail(str(e))
    try:
        FolderLock(prompts).acquire().release()  # fail before loading the model
        serve(model=model, prompts=prompts, host=host, port=port, token=token, config=config,
              protect_reads=protect_reads, device=_device(), max_inputs=max_inputs,
              max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes,
              max_concurrent_uploads=max_concurrent_uploads, max_concurrent_requests=max_concurrent_requests,
              header_timeout=header_timeout, body_timeout=body_timeout, min_body_rate=min_body_rate,
              max_connections=max_connections, backend=backend, vllm_urls=tuple(vllm_url or ()),
              vllm_max_model_len=vllm_max_model_len, vllm_eager=vllm_eager,
              vllm_tensor_parallel_size=vllm_tensor_parallel_size)
    except FolderLockedError as e:
        _fail(e.message)
    except UnsupportedError as e:  # the model's family cannot be served (families.CAPABILITIES)
        _fail(str(e))

