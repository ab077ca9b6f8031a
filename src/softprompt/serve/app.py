"""The HTTP API over an :class:`~softprompt.serve.engine.Engine` (FastAPI + pydantic).

Route handlers are plain functions that get the app's :class:`ServerState` (engine,
registry, limits) as a FastAPI dependency; bodies are in ``schemas.py``, the token and
body-size guard and the error bodies in ``guard.py``.

Endpoints (OpenAPI schema at ``/openapi.json``, interactive docs at ``/docs``):

====================================  ==========================================================
``POST /v1/classify``                 ``{task, inputs: [..], vote?}`` -> label + per-label probabilities
``POST /v1/generate``                 ``{task, input, max_new_tokens, stop_at_newline, stop, stream}``
``POST /v1/completions``              OpenAI-style; ``model`` is ``"<base>:<task>"``
``GET  /v1/models``                   OpenAI-style list of ``"<base>:<task>"`` ids
``GET  /v1/tasks`` / ``/v1/tasks/x``  the tasks being served
``PUT  /v1/tasks/{name}``             admin: upload a ``.safetensors`` prompt (raw request body)
``DELETE /v1/tasks/{name}``           admin: stop serving a task and delete its files
``POST /v1/admin/reload``             admin: re-scan the prompts folder
``GET  /healthz``                     liveness (always open)
``GET  /metrics``                     Prometheus text format (prometheus_client)
====================================  ==========================================================

Admin endpoints need ``Authorization: Bearer <token>`` with the token given at start-up
(without one they are disabled); ``protect_reads=True`` puts every other endpoint except
``/healthz`` (the docs and schema included) behind the same token, checked before any body
is read.  Errors are JSON ``{"error": {"code", "message", "type"}}`` with a 4xx status that
says what is wrong; a full queue or too many requests in flight answer 503 (too many uploads
429) with ``Retry-After``.  A client that disconnects has its work cancelled.  Every limit,
its default and flag: docs/serving.md, "Limits and guarantees".
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.task import TaskKind
from .engine import ClassifyResult, Engine, GenerateResult, InvalidInputError, ServeError, UnknownTaskError
from .guard import (
    DEFAULT_BODY_TIMEOUT, DEFAULT_MIN_BODY_RATE, AdminDisabledError, AuthError, Guard, error_response, token_problem,
)
from .jsonsafe import FiniteJSONResponse
from .registry import DEFAULT_MAX_UPLOAD_BYTES, Registry, validate_task_name
from .schemas import (
    ClassifyRequest, ClassifyResponse, CompletionRequest, GenerateRequest, GenerateResponse, LabelResult, Usage,
)
from .streaming import ClientGone, gather, sse, stream

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20


@dataclass
class ServerState:
    """What every route needs: the engine, the prompt folder, auth and per-request limits."""

    engine: Engine
    registry: Registry | None
    token: str | None
    protect_reads: bool
    max_inputs: int

    @property
    def base(self) -> str:
        return self.engine.base_name

    def check_inputs(self, n: int) -> None:
        if n > self.max_inputs:
            raise InvalidInputError(f"too many inputs: {n}; at most {self.max_inputs} per request", code="too_many_inputs")

    def need_registry(self) -> Registry:
        if self.registry is None:
            raise AdminDisabledError("this server has no prompts folder to write to")
        return self.registry


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


# ----------------------------------------------------------------------------- auth
def _check_token(request: Request, token: str) -> None:  # the guard checked already; kept for apps mounted without it
    why = token_problem(request.headers.get("authorization"), token)
    if why is not None:
        raise AuthError(why)


async def read_auth(request: Request, s: State) -> None:
    if s.token is not None and s.protect_reads:
        _check_token(request, s.token)


async def admin_auth(request: Request, s: State) -> None:
    if s.token is None:
        raise AdminDisabledError("admin endpoints are disabled: start the server with a token")
    _check_token(request, s.token)


# ----------------------------------------------------------------------------- errors
async def on_serve_error(request: Request, exc: ServeError):
    headers = {}
    if getattr(exc, "retry_after", None) is not None:
        headers["Retry-After"] = str(int(max(1, round(exc.retry_after))))  # type: ignore[attr-defined]
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    extra = {k: v for k, v in exc.extra.items() if isinstance(v, (str, int, float))}
    return error_response(exc.status, exc.code, exc.message, headers=headers or None, **extra)


async def on_client_gone(request: Request, exc: Exception):
    # nobody reads this; 499 (nginx's "client closed request") keeps the metrics honest
    return error_response(499, "cancelled", "the client went away; its work was cancelled")


def _loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def _validation_message(errors: list[dict]) -> tuple[str, str, list[dict]]:
    details = [{"loc": _loc(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors[:20]]
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        why = (e.get("ctx") or {}).get("error", "JSON decode error")
        return "malformed_json", f"the request body is not valid JSON ({why})", details
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in ("model_attributes_type", "dict_type") for e in errors):
        return "invalid_body", "the request body must be a JSON object (send Content-Type: application/json)", details
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
        return "invalid_body", "the request needs a JSON body", details
    msg = "; ".join(f"{d['loc']}: {d['msg']}" for d in details)
    return "invalid_request", msg, details


async def on_validation_error(request: Request, exc: RequestValidationError):
    code, msg, details = _validation_message(list(exc.errors()))
    return error_response(400 if code == "malformed_json" else 422, code, msg, details=details)


async def on_http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


async def on_internal_error(request: Request, exc: Exception):
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); the server keeps running")


# ----------------------------------------------------------------------------- helpers
def _label_result(r: ClassifyResult) -> LabelResult:
    return LabelResult(label=r.label, probabilities=r.probabilities, scores=r.scores, votes=r.votes, members=r.members)


# ----------------------------------------------------------------------------- reads
async def healthz(s: State):
    ok = s.engine.alive
    body = {"status": "ok" if ok else "unavailable", "model": s.base, "tasks": len(s.engine.tasks()),
            "queue_rows": s.engine.queued_rows}
    return JSONResponse(body, status_code=200 if ok else 503)


async def prometheus_metrics(s: State):
    return PlainTextResponse(s.engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def list_tasks(s: State):
    return {"model": s.base, "tasks": [t.info() for t in sorted(s.engine.tasks().values(), key=lambda t: t.name)]}


async def get_task(name: str, s: State):
    return s.engine.task(validate_task_name(name)).info()


async def list_models(s: State):
    return {"object": "list", "data": [
        {"id": f"{s.base}:{n}", "object": "model", "created": 0, "owned_by": "softprompt"}
        for n in sorted(s.engine.tasks())]}


# ----------------------------------------------------------------------------- inference
async def classify(req: ClassifyRequest, request: Request, s: State):
    s.check_inputs(len(req.inputs))
    futures = s.engine.submit_classify(req.task, req.inputs, vote=req.vote)
    results: list[ClassifyResult] = await gather(futures, request)
    return ClassifyResponse(task=req.task, version=results[0].version, model=s.base,
                            results=[_label_result(r) for r in results])


def _usage(r: GenerateResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids),
            "total_tokens": r.prompt_tokens + len(r.token_ids)}


async def generate(req: GenerateRequest, request: Request, s: State):
    engine, base = s.engine, s.base
    stops = tuple(req.stop or ())
    kw = dict(max_new_tokens=req.max_new_tokens, stop_at_newline=req.stop_at_newline, stop=stops)
    if req.stream:
        return stream(
            engine, lambda cb: engine.submit_generate(req.task, req.input, on_token=cb, **kw),
            make_chunk=lambda delta: {"text": delta},
            make_final=lambda r: {"done": True, "task": r.task, "version": r.version, "model": base,
                                  "text": r.text, "finish_reason": r.finish_reason, "usage": _usage(r),
                                  "members": r.members},
            stops=stops,
        )
    (res,) = await gather([engine.submit_generate(req.task, req.input, **kw)], request)
    return GenerateResponse(task=res.task, version=res.version, model=base, text=res.text,
                            finish_reason=res.finish_reason, usage=Usage(**_usage(res)), members=res.members)


def _task_of_model(s: ServerState, model: str) -> str:
    base, tasks = s.base, s.engine.tasks()
    if ":" in model:
        b, task = model.rsplit(":", 1)
        if b not in (base, s.engine.identity.name):
            raise UnknownTaskError(
                f"model {model!r} not found: this server serves base model {base!r}; use \"{base}:<task>\" "
                f"with a task from GET /v1/models", code="model_not_found", param="model")
    else:
        task = model
    if task not in tasks:
        raise UnknownTaskError(
            f"model {model!r} not found: no task {task!r}; available: "
            f"{[f'{base}:{n}' for n in sorted(tasks)]}", code="model_not_found", param="model")
    return task


class _Envelope:
    """The OpenAI completion body around a list of choices."""

    def __init__(self, model_id: str):
        self.id, self.created, self.model_id = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model_id

    def __call__(self, choices, usage=None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out


async def _classify_completion(s: ServerState, task: str, prompts: list[str], stream: bool, envelope: _Envelope,
                               request: Request):
    results: list[ClassifyResult] = await gather(s.engine.submit_classify(task, prompts), request)
    choices = []
    for i, r in enumerate(results):
        lp = {lab: (math.log(p) if p > 0 else -1e30) for lab, p in r.probabilities.items()}
        choices.append({
            "text": r.label, "index": i, "finish_reason": "stop", "probabilities": r.probabilities,
            "logprobs": {"tokens": [r.label], "token_logprobs": [lp[r.label]], "top_logprobs": [lp],
                         "text_offset": [0]},
        })
    if stream:
        async def cls_events():
            for c in choices:
                yield sse(envelope([c]))
            yield sse("[DONE]")
        return StreamingResponse(cls_events(), media_type="text/event-stream")
    return envelope(choices, {"prompt_tokens": 0, "completion_tokens": len(choices), "total_tokens": len(choices)})


async def completions(req: CompletionRequest, request: Request, s: State):
    engine = s.engine
    task = _task_of_model(s, req.model)
    spec = engine.task(task)
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    s.check_inputs(len(prompts))
    if req.echo:
        raise InvalidInputError("echo is not supported", param="echo")
    envelope = _Envelope(f"{s.base}:{task}")
    if spec.kind == TaskKind.CLASSIFICATION:
        return await _classify_completion(s, task, prompts, req.stream, envelope, request)
    if req.logprobs is not None:
        raise InvalidInputError("logprobs is not supported for generation tasks (decoding is greedy); leave it out",
                                param="logprobs")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens > engine.max_new_tokens_limit:  # as /v1/generate: refused, never silently capped
        raise InvalidInputError(f"max_tokens must be between 1 and {engine.max_new_tokens_limit}, got {max_tokens}",
                                param="max_tokens")
    kw = dict(max_new_tokens=max_tokens, stop_at_newline=False, stop=stops)
    if getattr(engine, "supports_sampling", False) and req.temperature:  # backends/vllm.py samples
        kw.update(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
    if req.stream:
        if len(prompts) != 1:
            raise InvalidInputError("streaming needs a single prompt", param="prompt")
        return stream(
            engine, lambda cb: engine.submit_generate(task, prompts[0], on_token=cb, **kw),
            make_chunk=lambda delta: envelope([{"text": delta, "index": 0, "logprobs": None, "finish_reason": None}]),
            make_final=lambda r: envelope([{"text": "", "index": 0, "logprobs": None, "finish_reason": r.finish_reason}]),
            stops=stops, trailer="[DONE]",
        )
    gens: list[GenerateResult] = await gather([engine.submit_generate(task, p, **kw) for p in prompts], request)
    choices = [{"text": g.text, "index": i, "logprobs": None, "finish_reason": g.finish_reason} for i, g in enumerate(gens)]
    pt = sum(g.prompt_tokens for g in gens)
    ct = sum(len(g.token_ids) for g in gens)
    return envelope(choices, {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct})


# ----------------------------------------------------------------------------- admin
async def put_task(name: str, request: Request, s: State):
    reg = s.need_registry()
    validate_task_name(name)
    data = await request.body()
    spec, replaced = await asyncio.to_thread(reg.put, name, data)
    return JSONResponse({"replaced": replaced, "task": spec.info()}, status_code=200 if replaced else 201)


async def delete_task(name: str, s: State):
    validate_task_name(name)
    if s.registry is not None:
        return await asyncio.to_thread(s.registry.delete, name)
    s.engine.task(name)
    spec = await asyncio.to_thread(s.engine.unregister, name)
    return {"deleted": spec.name, "version": spec.version, "files": []}


async def reload_prompts(s: State):
    return await asyncio.to_thread(s.need_registry().sync)


# ----------------------------------------------------------------------------- app
def _add_routes(app: FastAPI, max_upload: int) -> None:
    read, admin = [Depends(read_auth)], [Depends(admin_auth)]
    route = app.add_api_route
    route("/healthz", healthz, methods=["GET"], tags=["status"])
    route("/metrics", prometheus_metrics, methods=["GET"], tags=["status"], dependencies=read,
          response_class=PlainTextResponse)
    route("/v1/tasks", list_tasks, methods=["GET"], tags=["tasks"], dependencies=read)
    route("/v1/tasks/{name:path}", get_task, methods=["GET"], tags=["tasks"], dependencies=read)
    route("/v1/models", list_models, methods=["GET"], tags=["openai"], dependencies=read)
    route("/v1/classify", classify, methods=["POST"], tags=["inference"], dependencies=read,
          response_model=ClassifyResponse, response_model_exclude_none=True)
    route("/v1/generate", generate, methods=["POST"], tags=["inference"], dependencies=read,
          response_model=GenerateResponse, response_model_exclude_none=True)
    route("/v1/completions", completions, methods=["POST"], tags=["openai"], dependencies=read)
    upload_doc = {"requestBody": {"required": True, "description": (
        f"a softprompt .safetensors artifact (at most {max_upload} bytes), sent as the raw body"),
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
    route("/v1/tasks/{name:path}", put_task, methods=["PUT"], tags=["admin"], dependencies=admin,
          openapi_extra=upload_doc)
    route("/v1/tasks/{name:path}", delete_task, methods=["DELETE"], tags=["admin"], dependencies=admin)
    route("/v1/admin/reload", reload_prompts, methods=["POST"], tags=["admin"], dependencies=admin)


def create_app(
    engine: Engine,
    *,
    registry: Registry | None = None,
    token: str | None = None,
    protect_reads: bool = False,
    max_inputs: int = 64,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_upload_bytes: int | None = None,
    max_concurrent_uploads: int = 2,
    max_concurrent_requests: int = 256,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    min_body_rate: float = DEFAULT_MIN_BODY_RATE,
    manage_engine: bool = True,
) -> FastAPI:
    """Build the FastAPI app.  ``manage_engine``: start the engine with the app and stop it
    (draining the queue) at shutdown.  ``max_concurrent_uploads`` / ``max_concurrent_requests``
    bound the uploads being received and the requests in flight (beyond: 429 / 503 with
    Retry-After); a body must arrive within ``body_timeout`` s a piece and, past that, at
    ``min_body_rate`` bytes/s on average (else 408)."""
    max_upload = int(max_upload_bytes or (registry.max_upload_bytes if registry else DEFAULT_MAX_UPLOAD_BYTES))
    if registry is not None:
        registry.max_upload_bytes = max_upload

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.stop)

    app = FastAPI(
        title="softprompt serve",
        version="1",
        description=(
            "Many tasks' soft prompts served from one frozen model, with dynamic batching across tasks. "
            f"Base model: {engine.base_name}."),
        lifespan=lifespan,
        default_response_class=FiniteJSONResponse,  # never NaN in a body, never a 500 for it
    )
    app.state.engine = engine
    engine.metrics.served = engine.tasks  # a task label is a task being served, else "other"
    app.state.registry = registry
    app.state.server = ServerState(engine, registry, token, protect_reads, int(max_inputs))
    for exc, handler in ((ServeError, on_serve_error), (ClientGone, on_client_gone),
                         (RequestValidationError, on_validation_error), (StarletteHTTPException, on_http_error),
                         (Exception, on_internal_error)):
        app.add_exception_handler(exc, handler)
    _add_routes(app, max_upload)
    app.add_middleware(Guard, metrics=engine.metrics, max_body=int(max_body_bytes), max_upload=max_upload, token=token,
                       protect_reads=protect_reads, max_uploads=int(max_concurrent_uploads),
                       max_requests=int(max_concurrent_requests), body_timeout=float(body_timeout),
                       min_body_rate=float(min_body_rate))
    return app
