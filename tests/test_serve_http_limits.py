"""Regression tests for the HTTP layer of issue 21: slow clients (request heads and bodies
under a deadline, request slots taken only for complete bodies), metric labels from closed
sets, HEAD on GET routes, and non-finite JSON numbers."""
import asyncio
import json
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from softprompt.serve import Engine, create_app
from softprompt.serve.connection import http_protocol
from softprompt.serve.testing import ServerThread, error_of as err, random_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SENT = "{soft:3} review : {text} label :"
QA = "{soft:4} question : {text} answer :"
CLASSIFY = json.dumps({"task": "sent", "inputs": ["good"]}).encode()


def build(lm, **kw):
    model, tok = lm
    eng = Engine(model, tok, base_name="tiny", max_wait_ms=1, max_new_tokens_limit=16, max_input_tokens=64)
    eng.register("sent", random_prompt(model, SENT, verbalizer={"pos": " good", "neg": " bad"}, seed=1))
    eng.register("qa", random_prompt(model, QA, kind="generation", seed=2))
    return eng, create_app(eng, token=TOKEN, **kw)


def scope(method, path, headers=()):
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80)}


async def call(app, method, path, headers=(), receive=None, timeout=5.0):
    """Drive the ASGI app directly: (status, headers, body)."""
    out = {"status": None, "headers": {}, "body": b""}

    async def never():
        await asyncio.sleep(3600)

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
            out["headers"] = {k.decode().lower(): v.decode() for k, v in msg.get("headers", [])}
        else:
            out["body"] += msg.get("body", b"")

    await asyncio.wait_for(app(scope(method, path, headers), receive or never, send), timeout)
    return out["status"], out["headers"], out["body"]


def whole(body: bytes):
    sent = [False]

    async def receive():  # the body at once, then a client that waits for its answer
        if sent[0]:
            await asyncio.sleep(3600)
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


def trickle(every: float):
    async def receive():  # one byte every `every` seconds, never the end
        await asyncio.sleep(every)
        return {"type": "http.request", "body": b"x", "more_body": True}
    return receive


# ----------------------------------------------------------------------------- slow bodies
def test_a_trickling_body_holds_no_request_slot_and_gets_408(lm):
    eng, app = build(lm, max_concurrent_requests=1, body_timeout=0.4, min_body_rate=100)
    hdrs = [("content-type", "application/json"), ("content-length", "100000")]
    ok_hdrs = [("content-type", "application/json"), ("content-length", str(len(CLASSIFY)))]

    async def main():
        slow = [asyncio.ensure_future(call(app, "POST", "/v1/classify", hdrs, trickle(0.05))) for _ in range(3)]
        idle = asyncio.ensure_future(call(app, "POST", "/v1/classify", hdrs))  # sends nothing at all
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        for _ in range(3):  # the only request slot is free for complete bodies
            st, _, body = await call(app, "POST", "/v1/classify", ok_hdrs, whole(CLASSIFY))
            assert st == 200, body
        assert time.monotonic() - t0 < 2
        for st, headers, body in await asyncio.gather(*slow, idle):
            assert (st, json.loads(body)["error"]["code"]) == (408, "request_timeout"), body
            assert headers["connection"] == "close"

    with TestClient(app):  # starts the engine
        t0 = time.monotonic()
        asyncio.run(main())
        assert time.monotonic() - t0 < 3
    assert eng.metrics.rejected.value(reason="slow_body") == 4


def test_a_body_over_the_rate_deadline_is_refused_but_a_steady_one_is_not(lm):
    eng, app = build(lm, body_timeout=0.3, min_body_rate=2000)
    ok_hdrs = [("content-type", "application/json"), ("content-length", str(len(CLASSIFY)))]

    def pieces(data: bytes, n: int, every: float):
        parts = [data[i * len(data) // n:(i + 1) * len(data) // n] for i in range(n)]
        it = iter(parts)

        async def receive():
            await asyncio.sleep(every)
            part = next(it)
            return {"type": "http.request", "body": part, "more_body": part is not parts[-1]}
        return receive

    async def main():
        # each piece within the idle timeout, but 27 bytes in 0.6 s is far below 2000 bytes/s
        st, _, body = await call(app, "POST", "/v1/classify", ok_hdrs, pieces(CLASSIFY, 3, 0.2))
        assert st == 408, body
        st, _, body = await call(app, "POST", "/v1/classify", ok_hdrs, pieces(CLASSIFY, 3, 0.05))
        assert st == 200, body

    with TestClient(app):
        asyncio.run(main())


def test_a_stalled_upload_frees_its_upload_slot(lm, tmp_path):
    eng, app = build(lm, max_concurrent_uploads=1, body_timeout=0.3)
    hdrs = [("content-length", "5000"), *[(k.lower(), v) for k, v in AUTH.items()]]

    async def main():
        first = asyncio.ensure_future(call(app, "PUT", "/v1/tasks/fresh", hdrs))
        await asyncio.sleep(0.05)
        st, _, _ = await call(app, "PUT", "/v1/tasks/other", hdrs)
        assert st == 429  # the upload slot is still taken before the body (it bounds upload memory)
        st, headers, _ = await first
        assert st == 408 and headers["connection"] == "close"
        st, _, _ = await call(app, "PUT", "/v1/tasks/other", hdrs)
        assert st == 408  # not 429: the stalled upload gave its slot back

    with TestClient(app):
        asyncio.run(main())


# ----------------------------------------------------------------------------- on a real uvicorn
def _closed_after(sock: socket.socket, drip: bytes, every: float, limit: float) -> tuple[float, bytes]:
    """Send ``drip`` a byte at a time until the server closes; (seconds, what it answered)."""
    t0, got = time.monotonic(), b""
    sock.settimeout(every)
    i = 0
    while time.monotonic() - t0 < limit:
        try:
            if i < len(drip):
                sock.send(drip[i:i + 1])
                i += 1
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t0, got
        if not chunk:
            return time.monotonic() - t0, got
        got += chunk
    raise AssertionError(f"the server kept the connection open for {limit} s; it answered {got[:200]!r}")


def test_slow_heads_slow_bodies_and_idle_connections_are_closed(lm):
    eng, app = build(lm, body_timeout=0.5)
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    with ServerThread(app, http=http_protocol(0.5)) as srv:
        addr = ("127.0.0.1", srv.port)
        with socket.create_connection(addr) as s:  # a head that trickles in: 408, closed
            took, got = _closed_after(s, head, 0.05, 5)
        assert got.startswith(b"HTTP/1.1 408") and 0.4 < took < 2, (took, got)
        with socket.create_connection(addr) as s:  # a connection that never says anything: closed
            took, got = _closed_after(s, b"", 0.05, 5)
        assert got == b"" and 0.4 < took < 2, took
        with socket.create_connection(addr) as s:  # a complete head, then a trickling body: 408, closed
            s.sendall(head)
            took, got = _closed_after(s, b"x" * 1000, 0.1, 5)
        assert got.startswith(b"HTTP/1.1 408") and b"connection: close" in got.lower() and took < 2, (took, got)
        with socket.create_connection(addr) as s:  # after an answer, the next head has the same deadline
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            took, got = _closed_after(s, b"", 0.05, 5)
        assert got.startswith(b"HTTP/1.1 200") and 0.4 < took < 2, (took, got)
        with httpx.Client(base_url=srv.url) as c:  # keep-alive clients that send whole requests are unaffected
            for _ in range(3):
                assert c.post("/v1/classify", json={"task": "sent", "inputs": ["fine"]}).status_code == 200
                time.sleep(0.2)


# ----------------------------------------------------------------------------- metric labels
def test_metric_labels_come_from_closed_sets(lm):
    eng, app = build(lm, protect_reads=True)
    odd = "X" * 15_000

    async def main():
        for _ in range(3):
            st, _, _ = await call(app, odd, "/v1/classify")
            assert st == 401
            st, _, _ = await call(app, odd, "/healthz")
            assert st == 405

    with TestClient(app) as c:
        asyncio.run(main())
        err(c.post("/v1/classify", json={"task": "nope-123", "inputs": ["x"]}, headers=AUTH), 404, "unknown_task")
        eng.metrics.requests.inc(task="was-never-served", kind="classify", status="ok")  # e.g. removed meanwhile
        text = c.get("/metrics", headers=AUTH).text
    assert "XXXX" not in text and "nope-123" not in text and "was-never-served" not in text
    assert len(text) < 20_000
    assert 'softprompt_http_requests_total{method="other",route="unmatched",status="401"} 3.0' in text
    assert 'softprompt_http_requests_total{method="other",route="/healthz",status="405"} 3.0' in text
    assert eng.metrics.requests.value(task="other", kind="classify", status="ok") == 1


# ----------------------------------------------------------------------------- HEAD, NaN
def test_head_answers_like_get_without_a_body(lm):
    eng, app = build(lm)
    with TestClient(app) as c:
        for path in ("/healthz", "/v1/tasks", "/v1/tasks/sent", "/v1/models", "/metrics"):
            got, head = c.get(path), c.head(path)
            assert head.status_code == got.status_code == 200, (path, head.status_code)
            assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
        assert c.head("/v1/tasks/nope").status_code == 404
        assert c.head("/v1/classify").status_code == 405
        assert 'method="HEAD",route="/v1/tasks",status="200"' in c.get("/metrics").text


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(lm, field, value):
    eng, app = build(lm)
    body = '{"model": "tiny:qa", "prompt": "x", "max_tokens": 2, "%s": %s}' % (field, value)
    with TestClient(app) as c:
        e = err(c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"}), 422)
        assert field in e["message"]
        ok = c.post("/v1/completions", json={"model": "tiny:qa", "prompt": "x", "max_tokens": 2, field: 0.5})
        assert ok.status_code == 200, ok.text


def test_cli_shows_and_checks_the_http_limits(tmp_path):
    from typer.testing import CliRunner

    from softprompt.cli import app as cli

    r = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    for flag in ("--header-timeout", "--body-timeout", "--min-body-rate", "--max-connections"):
        assert flag in r.output, flag
    (tmp_path / "p").mkdir()
    r = CliRunner().invoke(cli, ["serve", "--prompts", str(tmp_path / "p"), "--body-timeout", "0"])
    assert r.exit_code == 2 and "timeouts must be > 0" in r.output and "Traceback" not in r.output, r.output


def test_serve_passes_the_connection_limits_to_uvicorn(lm, tmp_path, monkeypatch):
    import uvicorn

    import softprompt.families.loading
    from softprompt.serve import serve
    from softprompt.serve.connection import HeadTimeoutProtocol

    seen = {}
    monkeypatch.setattr(softprompt.families.loading, "load_model", lambda name, device=None: lm)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    (tmp_path / "p").mkdir()
    serve("tiny", tmp_path / "p", header_timeout=3.5, max_connections=7)
    assert issubclass(seen["http"], HeadTimeoutProtocol) and seen["http"].header_timeout == 3.5
    assert seen["limit_concurrency"] == 7
    with pytest.raises(ValueError, match="max_connections"):
        serve("tiny", tmp_path / "p", max_connections=0)
