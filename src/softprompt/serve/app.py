"""The HTTP API over an :class:`~softprompt.serve.engine.Engine` (FastAPI + pydantic).

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
``GET  /metrics``                     Prometheus text format
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
import hmac
import json
import logging
import math
import time
import uuid
from typing import Annotated, Any, Literal, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import ClassifyResult, Engine, GenerateResult, InvalidInputError, ServeError, UnknownTaskError
from .registry import DEFAULT_MAX_UPLOAD_BYTES, Registry, validate_task_name

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
SCHEMA_MAX_CHARS = 100_000  # hard ceiling in the schema; the engine enforces its (smaller) configured limit


# ----------------------------------------------------------------------------- schemas
Text = Annotated[StrictStr, Field(min_length=1, max_length=SCHEMA_MAX_CHARS)]
Fields = Annotated[dict[Annotated[StrictStr, Field(max_length=64)], Text], Field(min_length=1, max_length=16)]
InputValue = Union[Text, Fields]
TaskName = Annotated[StrictStr, Field(min_length=1, max_length=64, description="a task name, see GET /v1/tasks")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Strict):
    task: TaskName
    inputs: Annotated[list[InputValue], Field(min_length=1, description=(
        "texts, or objects mapping each of the task's input fields to text"))]
    vote: Literal["mean", "majority"] | None = Field(None, description="ensembles: override the task's vote")


class LabelResult(BaseModel):
    label: str
    probabilities: dict[str, float]
    scores: dict[str, float] | None = Field(None, description="summed log-probs of each label word (single prompts)")
    votes: dict[str, int] | None = Field(None, description="ensembles: members voting for each label")
    members: list[dict[str, Any]] | None = None


class ClassifyResponse(BaseModel):
    task: str
    version: int
    model: str
    results: list[LabelResult]


class GenerateRequest(_Strict):
    task: TaskName
    input: InputValue
    max_new_tokens: StrictInt = Field(32, ge=1, description="upper bound on new tokens (server limit applies)")
    stop_at_newline: StrictBool = True
    stop: Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=64)]], Field(max_length=4)] | None = None
    stream: StrictBool = Field(False, description="stream tokens as server-sent events")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    task: str
    version: int
    model: str
    text: str
    finish_reason: str
    usage: Usage
    members: list[dict[str, Any]] | None = None


class CompletionRequest(BaseModel):
    """The OpenAI legacy completions request; unknown OpenAI fields are accepted and ignored.
    Decoding is greedy (``temperature``/``top_p`` are ignored), except on the vLLM backend,
    which samples when ``temperature`` > 0 (with ``top_p`` and ``seed``)."""

    model_config = ConfigDict(extra="allow")
    model: Annotated[StrictStr, Field(min_length=1, max_length=200, description='"<base>:<task>", see GET /v1/models')]
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1)]]
    max_tokens: StrictInt | None = Field(16, ge=1)
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    n: StrictInt = Field(1, ge=1, le=1, description="only 1 is supported (decoding is greedy)")
    stream: StrictBool = False
    stop: Union[Annotated[StrictStr, Field(min_length=1, max_length=64)],
                Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=64)]], Field(max_length=4)], None] = None
    logprobs: StrictInt | None = Field(None, ge=0, le=5, description=(
        "classification tasks: the labels' log-probabilities are returned; generation tasks: not supported (422)"))
    echo: StrictBool = False
    user: StrictStr | None = None


# ----------------------------------------------------------------------------- errors
def _err_type(status: int) -> str:
    if status in (401, 403):
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status in (429, 503):
        return "overloaded_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_response(status: int, code: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "type": _err_type(status), **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


class AuthError(ServeError):
    status, code = 401, "unauthorized"


class AdminDisabledError(ServeError):
    status, code = 403, "admin_disabled"


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


# ----------------------------------------------------------------------------- middleware
def token_problem(authorization: str | None, token: str) -> str | None:
    """Why an ``Authorization`` header does not carry ``token`` (None when it does)."""
    header = authorization or ""
    scheme, _, cred = header.partition(" ")
    if not header or scheme.lower() != "bearer" or not cred.strip():
        return "this endpoint needs 'Authorization: Bearer <token>'"
    if not hmac.compare_digest(cred.strip().encode("utf-8", "surrogateescape"), token.encode()):
        return "wrong token"
    return None


def is_admin_path(method: str, path: str) -> bool:
    return (method in ("PUT", "DELETE") and path.startswith("/v1/tasks/")) or path.startswith("/v1/admin/")


OPEN_PATHS = frozenset({"/healthz"})


class _Guard:
    """Pure ASGI middleware in front of every route: records per-route HTTP metrics and
    refuses what must never cost memory, before one byte of a body is read:

    * a request that needs the token and lacks it (401; 403 when admin is disabled),
    * a body over the limit by its Content-Length (413), an upload without one (411),
    * an upload while ``max_uploads`` others are being received (429 + Retry-After),
    * a body-carrying request while ``max_requests`` are in flight (503 + Retry-After).

    Bodies are then read (bounded again while reading) and replayed to the app."""

    def __init__(self, app, *, metrics, max_body: int, max_upload: int, token: str | None = None,
                 protect_reads: bool = False, max_uploads: int = 2, max_requests: int = 256):
        self.app, self.metrics, self.max_body, self.max_upload = app, metrics, max_body, max_upload
        self.token, self.protect_reads = token, protect_reads
        self.max_uploads, self.max_requests = max_uploads, max_requests
        self.uploads = self.requests = 0  # in flight (one event loop: plain counters are enough)

    async def _reject(self, send, status: int, code: str, message: str, headers: dict | None = None) -> None:
        resp = error_response(status, code, message, headers=headers)
        await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})

    def _auth_error(self, scope, headers: dict) -> tuple[int, str, str] | None:
        method, path = scope["method"], scope["path"]
        if path in OPEN_PATHS:
            return None
        admin = is_admin_path(method, path)
        if admin and self.token is None:
            return 403, "admin_disabled", "admin endpoints are disabled: start the server with a token"
        if self.token is None or not (admin or self.protect_reads):
            return None
        why = token_problem(headers.get(b"authorization", b"").decode("latin-1"), self.token)
        return None if why is None else (401, "unauthorized", why)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]
        counted: list[str] = []
        finished = gone = False

        async def send_wrapper(msg):
            nonlocal finished
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                finished = True
            await send(msg)

        async def watched_receive():
            nonlocal gone
            msg = await receive()
            if msg["type"] == "http.disconnect":
                gone = True
            return msg

        try:
            headers = dict(scope.get("headers") or [])
            problem = self._auth_error(scope, headers)
            if problem is not None:
                hdrs = {"WWW-Authenticate": "Bearer"} if problem[0] == 401 else None
                return await self._reject(send_wrapper, *problem, headers=hdrs)
            is_upload = scope["method"] == "PUT" and scope["path"].startswith("/v1/tasks/")
            limit = self.max_upload if is_upload else self.max_body
            cl = headers.get(b"content-length")
            code = "upload_too_large" if is_upload else "body_too_large"
            if cl is not None and (not cl.isdigit() or int(cl) > limit):
                return await self._reject(send_wrapper, 413, code, f"the request body exceeds the limit of {limit} bytes")
            if is_upload and cl is None:
                return await self._reject(send_wrapper, 411, "length_required",
                                          "an upload needs a Content-Length header (chunked uploads are not accepted)")
            if scope["method"] not in ("POST", "PUT", "PATCH", "DELETE"):
                return await self.app(scope, watched_receive, send_wrapper)
            if is_upload:
                if self.uploads >= self.max_uploads:
                    self.metrics.rejected.inc(reason="uploads_busy")
                    return await self._reject(
                        send_wrapper, 429, "too_many_uploads",
                        f"{self.uploads} uploads are being received (limit {self.max_uploads}); retry later",
                        headers={"Retry-After": "1"})
                self.uploads += 1
                counted.append("uploads")
            else:
                if self.requests >= self.max_requests:
                    self.metrics.rejected.inc(reason="requests_in_flight")
                    return await self._reject(
                        send_wrapper, 503, "overloaded",
                        f"{self.requests} requests are in flight (limit {self.max_requests}); retry later",
                        headers={"Retry-After": "1"})
                self.requests += 1
                counted.append("requests")
            body = bytearray()
            more = True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    status[0] = 499
                    return
                body += msg.get("body", b"")
                if len(body) > limit:
                    return await self._reject(send_wrapper, 413, code, f"the request body exceeds the limit of {limit} bytes")
                more = msg.get("more_body", False)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await watched_receive()

            await self.app(scope, replay, send_wrapper)
        finally:
            for name in counted:
                setattr(self, name, getattr(self, name) - 1)
            if gone and not finished:  # the client left before its answer was complete (a dropped stream too)
                status[0] = 499
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.inc(route=path, method=scope.get("method", ""), status=str(status[0]))
            self.metrics.http_latency.observe(time.perf_counter() - t0, route=path)


# ----------------------------------------------------------------------------- helpers
def _label_result(r: ClassifyResult) -> LabelResult:
    return LabelResult(label=r.label, probabilities=r.probabilities, scores=r.scores, votes=r.votes, members=r.members)


def stream_safe_text(text: str, stops: tuple[str, ...]) -> str:
    """The part of a partial generation that can be shown already: cut at a stop string,
    holding back a possible stop-string prefix, an unfinished character and trailing space
    (so the streamed pieces always add up to the final, stripped text)."""
    if stops:
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        else:
            text = text[: max(0, len(text) - (max(map(len, stops)) - 1))]
    return text.rstrip("\ufffd").strip()


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode()


class ClientGone(Exception):
    """The client disconnected before its answer was ready (its work has been cancelled)."""


async def _wait_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read already, so the next
    ASGI message is the disconnect; servers send it when the connection closes)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _gather(futures, request: Request | None = None):
    """Await the engine's futures; if the client disconnects first, cancel them all (queued
    work is skipped, running generation stops) and raise :class:`ClientGone`."""
    wrapped = [asyncio.wrap_future(f) for f in futures]
    work = asyncio.gather(*wrapped)
    watcher = asyncio.ensure_future(_wait_disconnect(request)) if request is not None else None
    try:
        if watcher is None:
            return await work
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        raise ClientGone()
    except BaseException:
        for f in futures:
            f.cancel()
        for w in wrapped:
            w.cancel()
        work.cancel()
        raise
    finally:
        if watcher is not None:
            watcher.cancel()


# ----------------------------------------------------------------------------- app
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
    manage_engine: bool = True,
) -> FastAPI:
    """Build the FastAPI app.  ``manage_engine``: start the engine with the app and stop it
    (draining the queue) at shutdown.  ``max_concurrent_uploads`` / ``max_concurrent_requests``
    bound the bodies being received at once (beyond: 429 / 503 with Retry-After)."""
    max_upload = int(max_upload_bytes or (registry.max_upload_bytes if registry else DEFAULT_MAX_UPLOAD_BYTES))
    if registry is not None:
        registry.max_upload_bytes = max_upload
    base = engine.base_name
    metrics = engine.metrics

    from contextlib import asynccontextmanager

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
            f"Base model: {base}."),
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.registry = registry

    # ---------------------------------------------------------------- auth
    def _check_token(request: Request) -> None:  # the guard checked already; kept for apps mounted without it
        why = token_problem(request.headers.get("authorization"), token)  # type: ignore[arg-type]
        if why is not None:
            raise AuthError(why)

    async def read_auth(request: Request) -> None:
        if token is not None and protect_reads:
            _check_token(request)

    async def admin_auth(request: Request) -> None:
        if token is None:
            raise AdminDisabledError("admin endpoints are disabled: start the server with a token")
        _check_token(request)

    Read = [Depends(read_auth)]
    Admin = [Depends(admin_auth)]

    # ---------------------------------------------------------------- errors
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        headers = {}
        if getattr(exc, "retry_after", None) is not None:
            headers["Retry-After"] = str(int(max(1, round(exc.retry_after))))  # type: ignore[attr-defined]
        if isinstance(exc, AuthError):
            headers["WWW-Authenticate"] = "Bearer"
        extra = {k: v for k, v in exc.extra.items() if isinstance(v, (str, int, float))}
        return error_response(exc.status, exc.code, exc.message, headers=headers or None, **extra)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        # nobody reads this; 499 (nginx's "client closed request") keeps the metrics honest
        return error_response(499, "cancelled", "the client went away; its work was cancelled")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        code, msg, details = _validation_message(list(exc.errors()))
        return error_response(400 if code == "malformed_json" else 422, code, msg, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); the server keeps running")

    # ---------------------------------------------------------------- reads
    @app.get("/healthz", tags=["status"])
    async def healthz():
        ok = engine.alive
        body = {"status": "ok" if ok else "unavailable", "model": base, "tasks": len(engine.tasks()),
                "queue_rows": engine.queued_rows}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["status"], dependencies=Read, response_class=PlainTextResponse)
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/tasks", tags=["tasks"], dependencies=Read)
    async def list_tasks():
        return {"model": base, "tasks": [s.info() for s in sorted(engine.tasks().values(), key=lambda s: s.name)]}

    @app.get("/v1/tasks/{name:path}", tags=["tasks"], dependencies=Read)
    async def get_task(name: str):
        return engine.task(validate_task_name(name)).info()

    @app.get("/v1/models", tags=["openai"], dependencies=Read)
    async def list_models():
        return {"object": "list", "data": [
            {"id": f"{base}:{n}", "object": "model", "created": 0, "owned_by": "softprompt"}
            for n in sorted(engine.tasks())]}

    # ---------------------------------------------------------------- inference
    def _check_inputs(n: int) -> None:
        if n > max_inputs:
            raise InvalidInputError(f"too many inputs: {n}; at most {max_inputs} per request", code="too_many_inputs")

    @app.post("/v1/classify", tags=["inference"], dependencies=Read, response_model=ClassifyResponse,
              response_model_exclude_none=True)
    async def classify(req: ClassifyRequest, request: Request):
        _check_inputs(len(req.inputs))
        futures = engine.submit_classify(req.task, req.inputs, vote=req.vote)
        results: list[ClassifyResult] = await _gather(futures, request)
        return ClassifyResponse(task=req.task, version=results[0].version, model=base,
                                results=[_label_result(r) for r in results])

    def _stream(future_factory, *, make_chunk, make_final, stops: tuple[str, ...], trailer: str | None = None):
        """Submit a generation with a token callback and stream server-sent events."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        closed = False

        def on_token(ids: list[int]) -> None:
            if closed:
                raise RuntimeError("client went away")  # tells the engine to stop this row
            loop.call_soon_threadsafe(queue.put_nowait, ids)

        fut = future_factory(on_token)  # submission errors become normal JSON errors
        afut = asyncio.wrap_future(fut)

        async def events():
            nonlocal closed
            emitted = ""
            try:
                while True:
                    getter = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({getter, afut}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        break
                    ids = getter.result()
                    while not queue.empty():
                        ids = queue.get_nowait()
                    safe = stream_safe_text(engine.decode(ids), stops)
                    if len(safe) > len(emitted) and safe.startswith(emitted):
                        yield _sse(make_chunk(safe[len(emitted):]))
                        emitted = safe
                try:
                    res: GenerateResult = afut.result()
                except ServeError as e:
                    yield _sse({"error": {"code": e.code, "message": e.message, "type": _err_type(e.status)}})
                    return
                except Exception as e:  # noqa: BLE001
                    yield _sse({"error": {"code": "internal_error", "message": type(e).__name__, "type": "server_error"}})
                    return
                if res.text.startswith(emitted) and len(res.text) > len(emitted):
                    yield _sse(make_chunk(res.text[len(emitted):]))
                yield _sse(make_final(res))
                if trailer is not None:
                    yield _sse(trailer)
            finally:
                closed = True
                if not afut.done():
                    afut.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/generate", tags=["inference"], dependencies=Read, response_model=GenerateResponse,
              response_model_exclude_none=True)
    async def generate(req: GenerateRequest, request: Request):
        stops = tuple(req.stop or ())
        kw = dict(max_new_tokens=req.max_new_tokens, stop_at_newline=req.stop_at_newline, stop=stops)

        def usage(r: GenerateResult) -> dict:
            return {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids),
                    "total_tokens": r.prompt_tokens + len(r.token_ids)}

        if req.stream:
            return _stream(
                lambda cb: engine.submit_generate(req.task, req.input, on_token=cb, **kw),
                make_chunk=lambda delta: {"text": delta},
                make_final=lambda r: {"done": True, "task": r.task, "version": r.version, "model": base,
                                      "text": r.text, "finish_reason": r.finish_reason, "usage": usage(r),
                                      "members": r.members},
                stops=stops,
            )
        (res,) = await _gather([engine.submit_generate(req.task, req.input, **kw)], request)
        return GenerateResponse(task=res.task, version=res.version, model=base, text=res.text,
                                finish_reason=res.finish_reason, usage=Usage(**usage(res)), members=res.members)

    def _task_of_model(model: str) -> str:
        if ":" in model:
            b, task = model.rsplit(":", 1)
            if b not in (base, engine.identity.name):
                raise UnknownTaskError(
                    f"model {model!r} not found: this server serves base model {base!r}; use \"{base}:<task>\" "
                    f"with a task from GET /v1/models", code="model_not_found", param="model")
        else:
            task = model
        if task not in engine.tasks():
            raise UnknownTaskError(
                f"model {model!r} not found: no task {task!r}; available: "
                f"{[f'{base}:{n}' for n in sorted(engine.tasks())]}", code="model_not_found", param="model")
        return task

    @app.post("/v1/completions", tags=["openai"], dependencies=Read)
    async def completions(req: CompletionRequest, request: Request):
        task = _task_of_model(req.model)
        spec = engine.task(task)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        _check_inputs(len(prompts))
        if req.echo:
            raise InvalidInputError("echo is not supported", param="echo")
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model_id = f"{base}:{task}"

        def envelope(choices, usage=None) -> dict:
            out = {"id": cid, "object": "text_completion", "created": created, "model": model_id, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if spec.kind == "classification":
            results: list[ClassifyResult] = await _gather(engine.submit_classify(task, prompts), request)
            choices = []
            for i, r in enumerate(results):
                lp = {lab: (math.log(p) if p > 0 else -1e30) for lab, p in r.probabilities.items()}
                choices.append({
                    "text": r.label, "index": i, "finish_reason": "stop", "probabilities": r.probabilities,
                    "logprobs": {"tokens": [r.label], "token_logprobs": [lp[r.label]], "top_logprobs": [lp],
                                 "text_offset": [0]},
                })
            if req.stream:
                async def cls_events():
                    for c in choices:
                        yield _sse(envelope([c]))
                    yield _sse("[DONE]")
                return StreamingResponse(cls_events(), media_type="text/event-stream")
            return envelope(choices, {"prompt_tokens": 0, "completion_tokens": len(choices), "total_tokens": len(choices)})

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
            kw.update(temperature=req.temperature, top_p=req.top_p, seed=(req.model_extra or {}).get("seed"))
        if req.stream:
            if len(prompts) != 1:
                raise InvalidInputError("streaming needs a single prompt", param="prompt")
            return _stream(
                lambda cb: engine.submit_generate(task, prompts[0], on_token=cb, **kw),
                make_chunk=lambda delta: envelope([{"text": delta, "index": 0, "logprobs": None, "finish_reason": None}]),
                make_final=lambda r: envelope([{"text": "", "index": 0, "logprobs": None, "finish_reason": r.finish_reason}]),
                stops=stops, trailer="[DONE]",
            )
        futures = [engine.submit_generate(task, p, **kw) for p in prompts]
        gens: list[GenerateResult] = await _gather(futures, request)
        choices = [{"text": g.text, "index": i, "logprobs": None, "finish_reason": g.finish_reason} for i, g in enumerate(gens)]
        pt = sum(g.prompt_tokens for g in gens)
        ct = sum(len(g.token_ids) for g in gens)
        return envelope(choices, {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct})

    # ---------------------------------------------------------------- admin
    def _need_registry() -> Registry:
        if registry is None:
            raise AdminDisabledError("this server has no prompts folder to write to")
        return registry

    upload_doc = {"requestBody": {"required": True, "description": (
        f"a softprompt .safetensors artifact (at most {max_upload} bytes), sent as the raw body"),
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.put("/v1/tasks/{name:path}", tags=["admin"], dependencies=Admin, openapi_extra=upload_doc)
    async def put_task(name: str, request: Request):
        reg = _need_registry()
        validate_task_name(name)
        data = await request.body()
        spec, replaced = await asyncio.to_thread(reg.put, name, data)
        return JSONResponse({"replaced": replaced, "task": spec.info()}, status_code=200 if replaced else 201)

    @app.delete("/v1/tasks/{name:path}", tags=["admin"], dependencies=Admin)
    async def delete_task(name: str):
        validate_task_name(name)
        if registry is not None:
            return await asyncio.to_thread(registry.delete, name)
        engine.task(name)
        spec = await asyncio.to_thread(engine.unregister, name)
        return {"deleted": spec.name, "version": spec.version, "files": []}

    @app.post("/v1/admin/reload", tags=["admin"], dependencies=Admin)
    async def reload_prompts():
        return await asyncio.to_thread(_need_registry().sync)

    app.add_middleware(_Guard, metrics=metrics, max_body=int(max_body_bytes), max_upload=max_upload, token=token,
                       protect_reads=protect_reads, max_uploads=int(max_concurrent_uploads),
                       max_requests=int(max_concurrent_requests))
    return app
