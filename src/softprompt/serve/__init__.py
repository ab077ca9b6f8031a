"""Serve many tasks' soft prompts from one frozen model over HTTP.

``engine.py`` (dynamic batching across tasks, independent of HTTP), ``registry.py`` (the
prompt folder on disk), ``app.py`` (FastAPI) and :func:`serve`, which wires them together
and runs uvicorn (``softprompt serve``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import EngineConfig
from .engine import (
    ClassifyResult, Engine, GenerateResult, InvalidInputError, ModelMismatchError, OverloadedError,
    PromptRejectedError, ServeError, TaskSpec, UnknownTaskError,
)
from .registry import FolderLock, FolderLockedError, Registry, validate_task_name

TOKEN_ENV_VAR = "SOFTPROMPT_SERVE_TOKEN"

logger = logging.getLogger(__name__)


def create_app(engine: Engine, **kwargs):
    """See :func:`softprompt.serve.app.create_app` (imported lazily: FastAPI is optional)."""
    from .app import create_app as _create_app

    return _create_app(engine, **kwargs)


def serve(
    model: str = "smollm2-135m",
    prompts: Path | str = Path("prompts"),
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    config: EngineConfig | None = None,
    protect_reads: bool = False,
    *,
    max_inputs: int = 64,
    max_upload_bytes: int = 8 << 20,
    max_body_bytes: int = 1 << 20,
    max_concurrent_uploads: int = 2,
    max_concurrent_requests: int = 256,
    header_timeout: float = 10.0,
    body_timeout: float = 10.0,
    min_body_rate: float = 1024.0,
    max_connections: int = 1000,
    device: str | None = None,
    log_level: str = "info",
    backend: str = "engine",
    vllm_urls: tuple[str, ...] | list[str] = (),
    vllm_max_model_len: int | None = None,
    vllm_eager: bool = False,
    vllm_tensor_parallel_size: int = 1,
) -> None:
    """Load ``model`` once and every prompt in ``prompts``, then serve them with uvicorn.

    ``token`` (or the ``SOFTPROMPT_SERVE_TOKEN`` environment variable, which keeps it out
    of the process list) enables the admin endpoints; ``protect_reads`` puts the other
    endpoints (except ``/healthz``) behind it too.  ``backend="vllm"`` sends the model work
    to vLLM (``backends/vllm.py``): to the servers at ``vllm_urls``, or to vLLM's engine in
    this process when there are none.  ``config``: the engine's batching and limits (the vLLM
    backend takes its limits).  HTTP-layer limits against slow clients: a request head must
    arrive within ``header_timeout`` s, a body within ``body_timeout`` s a piece and then at
    ``min_body_rate`` bytes/s; at most ``max_connections`` connections are served (beyond:
    503).  Blocks until the server stops."""
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("serving needs the 'serve' extra: pip install 'softprompt[serve]'") from e
    from ..families.loading import load_model

    token = token or os.environ.get(TOKEN_ENV_VAR) or None
    if protect_reads and token is None:
        raise ValueError(f"protect_reads needs a token (--token or ${TOKEN_ENV_VAR})")
    if backend not in ("engine", "vllm"):
        raise ValueError(f"backend must be 'engine' or 'vllm', got {backend!r}")
    from .connection import http_limits_problem, http_protocol

    why = http_limits_problem(header_timeout, body_timeout, min_body_rate, max_connections)
    if why is not None:  # before the model loads
        raise ValueError(why)
    protocol = http_protocol(header_timeout)
    config = config or EngineConfig()
    root = Path(prompts).expanduser()
    lock = FolderLock(root).acquire()  # before the model loads: a second server fails fast
    try:
        if backend == "vllm":
            from .backends.vllm import make_vllm_backend

            engine = make_vllm_backend(
                model, urls=list(vllm_urls), max_model_len=vllm_max_model_len, enforce_eager=vllm_eager,
                tensor_parallel_size=vllm_tensor_parallel_size, **config.limits())
        else:
            lm, tokenizer = load_model(model, device=device)
            engine = Engine(lm, tokenizer, config, base_name=model)
        registry = Registry(root, engine, max_upload_bytes=max_upload_bytes)
        recovered = registry.recover()
        if recovered["removed"] or recovered["restored"]:
            print(f"softprompt serve: cleaned up after an interrupted run: {recovered}", flush=True)
        report = registry.sync()
        for name, err in report["errors"].items():
            logger.warning("prompt %r not loaded: %s", name, err)
        loaded = report["added"] + report["replaced"]
        print(f"softprompt serve ({backend}{': ' + ', '.join(vllm_urls) if vllm_urls else ''}): {model} with {len(loaded)} task(s) "
              f"from {registry.root}: "
              f"{', '.join(sorted(loaded)) or '(none)'}"
              + (f"; {len(report['errors'])} rejected" if report["errors"] else ""), flush=True)
        app = create_app(engine, registry=registry, token=token, protect_reads=protect_reads,
                         max_inputs=max_inputs, max_upload_bytes=max_upload_bytes, max_body_bytes=max_body_bytes,
                         max_concurrent_uploads=max_concurrent_uploads, max_concurrent_requests=max_concurrent_requests,
                         body_timeout=body_timeout, min_body_rate=min_body_rate)
        uvicorn.run(app, host=host, port=port, log_level=log_level, http=protocol, limit_concurrency=max_connections)
    finally:
        lock.release()


__all__ = [
    "ClassifyResult", "Engine", "EngineConfig", "FolderLock", "FolderLockedError", "GenerateResult", "InvalidInputError",
    "ModelMismatchError", "OverloadedError",
    "PromptRejectedError", "Registry", "ServeError", "TaskSpec", "UnknownTaskError", "create_app", "serve",
    "validate_task_name", "TOKEN_ENV_VAR",
]
