"""How the vLLM backend reaches vLLM: its async engine in this process, or remote vLLM
OpenAI servers (Completions with base64 ``prompt_embeds``).

Both offer the same two coroutines, so ``vllm.py`` does not care where vLLM runs:

* ``next_logprobs(embeds, token_ids)``: the log-probs of ``token_ids`` as the next token
  after the input embeddings (vLLM's ``logprob_token_ids``, raw log-probs over the whole
  vocabulary: what label scoring needs);
* ``generate(embeds, params, on_ids)``: new token ids and vLLM's finish reason, calling
  ``on_ids(ids_so_far)`` as tokens arrive when it is given (streaming).

``params`` holds vLLM sampling fields (``max_tokens``, ``temperature``, ``top_p``,
``seed``, ``stop``, ``stop_token_ids``).
"""
from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

OnIds = Callable[[list[int]], None] | None


class VllmUnavailableError(RuntimeError):
    """No vLLM engine or replica can take the request."""


class ClientGoneError(RuntimeError):
    """The token callback failed (a streaming client went away): the request is dropped."""


def encode_embeds(embeds: torch.Tensor) -> str:
    """A [T, hidden] tensor as vLLM's OpenAI server reads ``prompt_embeds``: ``torch.save``
    bytes, base64.  Costs about T x hidden x 4 x 4/3 bytes (fp32) plus ~1.5 KB of framing."""
    buf = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- in-process
class InProcessTransport:
    """vLLM's ``AsyncLLM`` in this process (its engine core is a spawned child process, so
    the program that builds it needs the ``if __name__ == "__main__"`` guard)."""

    def __init__(self, model_path: str, *, max_model_len: int | None = None, max_logprobs: int = 128,
                 tensor_parallel_size: int = 1, engine_kwargs: dict[str, Any] | None = None):
        self.model_path = model_path
        self.kwargs = dict(model=model_path, tokenizer=model_path, dtype="float32", enable_prompt_embeds=True,
                           max_logprobs=max_logprobs, enable_prefix_caching=False,
                           tensor_parallel_size=int(tensor_parallel_size), **(engine_kwargs or {}))
        if max_model_len:
            self.kwargs["max_model_len"] = int(max_model_len)
        self.llm = None
        self._ids = itertools.count()

    async def start(self) -> None:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise VllmUnavailableError(
                f"the vLLM backend needs vLLM in this environment ({e}); build it with `make setup-vllm` "
                "and run .venv-vllm/bin/softprompt, or point --vllm-url at running vLLM servers") from e
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.kwargs))

    async def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    @property
    def alive(self) -> bool:
        return self.llm is not None and not getattr(self.llm, "errored", False)

    def describe(self) -> dict:
        return {"mode": "in-process", "model": self.model_path}

    async def _run(self, embeds: torch.Tensor, sp, on_ids: OnIds = None):
        if self.llm is None:
            raise VllmUnavailableError("the in-process vLLM engine is not running")
        final = None
        async for out in self.llm.generate({"prompt_embeds": embeds.detach().to("cpu").contiguous()}, sp,
                                           request_id=f"sp-{next(self._ids)}-{uuid.uuid4().hex[:8]}"):
            final = out
            if on_ids is not None and not out.finished:
                on_ids(list(out.outputs[0].token_ids))
        return final.outputs[0]

    async def next_logprobs(self, embeds: torch.Tensor, token_ids: list[int]) -> dict[int, float]:
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids), detokenize=False)
        comp = await self._run(embeds, sp)
        step = comp.logprobs[0]
        return {int(t): float(step[t].logprob) for t in token_ids}

    async def generate(self, embeds: torch.Tensor, params: dict, on_ids: OnIds = None) -> tuple[list[int], str]:
        from vllm import SamplingParams

        sp = SamplingParams(**params)
        comp = await self._run(embeds, sp, on_ids)
        return list(comp.token_ids), str(comp.finish_reason or "length")


# ----------------------------------------------------------------------------- remote
class _Replica:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.healthy = False
        self.inflight = 0
        self.model: str | None = None
        self.last_error: str | None = None
        self.served = 0


class RemoteTransport:
    """One or more vLLM OpenAI servers (each started with ``--enable-prompt-embeds``):
    requests go to the healthy replica with the fewest in flight (ties in turn); a replica
    that fails a request or its ``/health`` probe is skipped until a probe passes again.
    A request that fails on a replica before any token was streamed is retried once on
    another."""

    def __init__(self, urls: list[str], *, health_interval_s: float = 5.0, timeout_s: float = 600.0,
                 api_key: str | None = None):
        if not urls:
            raise ValueError("the remote vLLM transport needs at least one --vllm-url")
        self.replicas = [_Replica(u) for u in urls]
        self.health_interval_s = float(health_interval_s)
        self.timeout_s = float(timeout_s)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._turn = itertools.count()
        self._client = None
        self._probe_task: asyncio.Task | None = None

    async def start(self, *, wait_s: float = 0.0) -> None:
        import httpx

        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=5.0), headers=self.headers)
        deadline = time.monotonic() + wait_s
        while True:
            await self.probe_all()
            if any(r.healthy for r in self.replicas) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        if not any(r.healthy for r in self.replicas):
            logger.warning("no vLLM replica is healthy yet: %s", {r.url: r.last_error for r in self.replicas})
        self._probe_task = asyncio.create_task(self._probe_forever())

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def alive(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def describe(self) -> dict:
        return {"mode": "remote", "replicas": [
            {"url": r.url, "healthy": r.healthy, "inflight": r.inflight, "served": r.served, "model": r.model,
             "last_error": r.last_error} for r in self.replicas]}

    async def probe(self, r: _Replica) -> None:
        try:
            resp = await self._client.get(f"{r.url}/health", timeout=5.0)
            resp.raise_for_status()
            if r.model is None:
                models = (await self._client.get(f"{r.url}/v1/models", timeout=5.0)).json()
                r.model = models["data"][0]["id"]
            r.healthy, r.last_error = True, None
        except Exception as e:  # noqa: BLE001 - any failure marks the replica down
            r.healthy, r.last_error = False, f"{type(e).__name__}: {e}"[:200]

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in self.replicas))

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.probe_all()

    def _pick(self, exclude: set[str]) -> _Replica:
        ok = [r for r in self.replicas if r.healthy and r.url not in exclude]
        if not ok:
            raise VllmUnavailableError(
                "no healthy vLLM replica: " + "; ".join(f"{r.url}: {r.last_error or 'down'}" for r in self.replicas))
        low = min(r.inflight for r in ok)
        ok = [r for r in ok if r.inflight == low]
        return ok[next(self._turn) % len(ok)]

    async def _complete(self, body: dict, on_ids: OnIds = None) -> dict:
        """POST /v1/completions on a replica; returns the first choice (token_ids, finish_reason, logprobs)."""
        tried: set[str] = set()
        delivered = [False]  # tokens already streamed to the caller: no retry elsewhere then

        def relay(ids: list[int]) -> None:
            delivered[0] = True
            on_ids(ids)

        while True:
            r = self._pick(tried)
            tried.add(r.url)
            r.inflight += 1
            try:
                payload = {**body, "model": r.model}
                if on_ids is None:
                    resp = await self._client.post(f"{r.url}/v1/completions", json=payload)
                    if resp.status_code >= 400:
                        raise _ReplicaAnswer(resp.status_code, resp.text)
                    choice = resp.json()["choices"][0]
                else:
                    choice = await self._stream(r, payload, relay)
                r.served += 1
                return choice
            except ClientGoneError:  # our caller stopped listening: the replica is fine
                raise
            except _ReplicaAnswer as e:  # the replica answered: the request itself is at fault
                raise VllmUnavailableError(f"vLLM at {r.url} refused the request ({e.status}): {e.text[:300]}") from None
            except Exception as e:  # noqa: BLE001 - connection-level: mark down, try another replica
                r.healthy, r.last_error = False, f"{type(e).__name__}: {e}"[:200]
                logger.warning("vLLM replica %s failed (%s); marked down", r.url, r.last_error)
                if delivered[0] or not any(x.healthy and x.url not in tried for x in self.replicas):
                    raise VllmUnavailableError(f"vLLM request failed on {r.url}: {r.last_error}") from None
            finally:
                r.inflight -= 1

    async def _stream(self, r: _Replica, payload: dict, on_ids) -> dict:
        ids: list[int] = []
        finish = None
        async with self._client.stream("POST", f"{r.url}/v1/completions", json={**payload, "stream": True}) as resp:
            if resp.status_code >= 400:
                raise _ReplicaAnswer(resp.status_code, (await resp.aread()).decode(errors="replace"))
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise _ReplicaAnswer(500, json.dumps(chunk["error"]))
                for c in chunk.get("choices", []):
                    ids.extend(c.get("token_ids") or [])
                    finish = c.get("finish_reason") or finish
                if finish is None:
                    try:
                        on_ids(list(ids))
                    except Exception as e:  # noqa: BLE001 - closing the stream aborts the request in vLLM
                        raise ClientGoneError(str(e)) from e
        return {"token_ids": ids, "finish_reason": finish}

    async def next_logprobs(self, embeds: torch.Tensor, token_ids: list[int]) -> dict[int, float]:
        body = {"prompt_embeds": encode_embeds(embeds), "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
                "logprob_token_ids": list(token_ids), "return_tokens_as_token_ids": True}
        choice = await self._complete(body)
        top = choice["logprobs"]["top_logprobs"][0]
        out = {int(k.split(":", 1)[1]): float(v) for k, v in top.items()}
        missing = [t for t in token_ids if t not in out]
        if missing:
            raise VllmUnavailableError(f"vLLM returned no log-prob for token ids {missing[:5]}")
        return {t: out[t] for t in token_ids}

    async def generate(self, embeds: torch.Tensor, params: dict, on_ids: OnIds = None) -> tuple[list[int], str]:
        body = {"prompt_embeds": encode_embeds(embeds), "return_token_ids": True, "skip_special_tokens": True,
                **{k: v for k, v in params.items() if v is not None and k != "detokenize"}}
        choice = await self._complete(body, on_ids)
        return list(choice.get("token_ids") or []), str(choice.get("finish_reason") or "length")


class _ReplicaAnswer(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(f"{status}: {text[:200]}")
        self.status, self.text = status, text
