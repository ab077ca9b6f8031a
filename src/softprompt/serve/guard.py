"""The HTTP layer's error bodies and its guard: a pure ASGI middleware that checks the token
and bounds request bodies before one byte is read, reads bodies under a deadline before they
take a request slot, and records per-route HTTP metrics under closed label sets."""
from __future__ import annotations

import asyncio
import hmac
import time

from fastapi.responses import JSONResponse

from .engine import ServeError

# ----------------------------------------------------------------------------- errors
def err_type(status: int) -> str:
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
    body = {"error": {"code": code, "message": message, "type": err_type(status), **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


class AuthError(ServeError):
    status, code = 401, "unauthorized"


class AdminDisabledError(ServeError):
    status, code = 403, "admin_disabled"




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
# metric label values come from closed sets: a client's method string never becomes a label
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
DEFAULT_BODY_TIMEOUT = 10.0
DEFAULT_MIN_BODY_RATE = 1024.0


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "other"


class BodyTooLarge(Exception):
    pass


class SlowBody(Exception):
    pass


class ClientLeft(Exception):
    pass


async def read_body(receive, limit: int, timeout: float, min_rate: float) -> bytes:
    """The whole request body, at most ``limit`` bytes.  Raises :class:`SlowBody` when no
    piece arrives for ``timeout`` s, or when, past the first ``timeout`` s, the body has
    arrived slower than ``min_rate`` bytes/s on average (0: no rate); :class:`ClientLeft`
    on a disconnect.  A trickling client thus holds its connection for a bounded time."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    body = bytearray()
    while True:
        # past t0 + max(timeout, bytes so far / rate) the average is below the rate
        due = t0 + (max(timeout, len(body) / min_rate) if min_rate > 0 else float("inf"))
        wait = min(timeout, due - loop.time())
        slow = f"the request body arrived slower than {min_rate:g} bytes/s"
        if wait <= 0:
            raise SlowBody(slow)
        try:
            msg = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            raise SlowBody(slow if wait < timeout else f"no part of the request body came for {timeout:g} s") from None
        if msg["type"] == "http.disconnect":
            raise ClientLeft()
        body += msg.get("body", b"")
        if len(body) > limit:
            raise BodyTooLarge()
        if not msg.get("more_body", False):
            return bytes(body)


class Guard:
    """Pure ASGI middleware in front of every route: records per-route HTTP metrics and
    refuses, from the headers alone (before one byte of a body is read):

    * a request that needs the token and lacks it (401; 403 when admin is disabled),
    * a body over the limit by its Content-Length (413), an upload without one (411),
    * an upload while ``max_uploads`` others are being received (429 + Retry-After).

    Then it reads the body (bounded again while reading) within ``body_timeout`` /
    ``min_body_rate`` (else 408 + ``Connection: close``) and only then takes one of the
    ``max_requests`` request slots (503 + Retry-After when none is free): a client that
    trickles its body never holds a slot.  Uploads take their slot before the body, as it
    bounds the memory of 8 MiB bodies; the deadline frees it.  ``HEAD`` is answered as
    ``GET`` without a body."""

    def __init__(self, app, *, metrics, max_body: int, max_upload: int, token: str | None = None,
                 protect_reads: bool = False, max_uploads: int = 2, max_requests: int = 256,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT, min_body_rate: float = DEFAULT_MIN_BODY_RATE):
        if not body_timeout > 0 or not min_body_rate >= 0:
            raise ValueError(f"body_timeout must be > 0 and min_body_rate >= 0, got {body_timeout}, {min_body_rate}")
        self.app, self.metrics, self.max_body, self.max_upload = app, metrics, max_body, max_upload
        self.token, self.protect_reads = token, protect_reads
        self.max_uploads, self.max_requests = max_uploads, max_requests
        self.body_timeout, self.min_body_rate = float(body_timeout), float(min_body_rate)
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

    def _take(self, kind: str) -> tuple[int, str, str] | None:
        """Take an upload or request slot; the refusal when none is free."""
        if kind == "uploads" and self.uploads >= self.max_uploads:
            self.metrics.rejected.inc(reason="uploads_busy")
            return 429, "too_many_uploads", f"{self.uploads} uploads are being received (limit {self.max_uploads}); retry later"
        if kind == "requests" and self.requests >= self.max_requests:
            self.metrics.rejected.inc(reason="requests_in_flight")
            return 503, "overloaded", f"{self.requests} requests are in flight (limit {self.max_requests}); retry later"
        setattr(self, kind, getattr(self, kind) + 1)
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]
        counted: list[str] = []
        finished = gone = False
        head = scope["method"] == "HEAD"
        app_scope = {**scope, "method": "GET"} if head else scope  # the app routes HEAD as GET

        async def send_wrapper(msg):
            nonlocal finished
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body":
                if not msg.get("more_body", False):
                    finished = True
                if head and msg.get("body"):
                    msg = {**msg, "body": b""}
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
            too_large = f"the request body exceeds the limit of {limit} bytes"
            if cl is not None and (not cl.isdigit() or int(cl) > limit):
                return await self._reject(send_wrapper, 413, code, too_large)
            if is_upload and cl is None:
                return await self._reject(send_wrapper, 411, "length_required",
                                          "an upload needs a Content-Length header (chunked uploads are not accepted)")
            if scope["method"] not in BODY_METHODS:  # GET routes answer HEAD too (without the body)
                return await self.app(app_scope, watched_receive, send_wrapper)
            if is_upload:  # before the body: this slot bounds the memory of large uploads
                if (refused := self._take("uploads")) is not None:
                    return await self._reject(send_wrapper, *refused, headers={"Retry-After": "1"})
                counted.append("uploads")
            try:
                body = await read_body(receive, limit, self.body_timeout, self.min_body_rate)
            except ClientLeft:
                status[0] = 499
                return
            except BodyTooLarge:
                return await self._reject(send_wrapper, 413, code, too_large)
            except SlowBody as e:
                self.metrics.rejected.inc(reason="slow_body")
                return await self._reject(send_wrapper, 408, "request_timeout", str(e), headers={"Connection": "close"})
            if not is_upload:  # a request slot only once the body is complete
                if (refused := self._take("requests")) is not None:
                    return await self._reject(send_wrapper, *refused, headers={"Retry-After": "1"})
                counted.append("requests")
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await watched_receive()

            await self.app(scope, replay, send_wrapper)
        finally:
            for name in counted:
                setattr(self, name, getattr(self, name) - 1)
            if gone and not finished:  # the client left before its answer was complete (a dropped stream too)
                status[0] = 499
            route = app_scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.inc(route=path, method=method_label(scope.get("method", "")),
                                           status=status_label(status[0]))
            self.metrics.http_latency.observe(time.perf_counter() - t0, route=path)
