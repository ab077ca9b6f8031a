"""The HTTP layer's error bodies and its guard: a pure ASGI middleware that checks the token
and bounds request bodies before one byte is read, and records per-route HTTP metrics."""
from __future__ import annotations

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


class Guard:
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

