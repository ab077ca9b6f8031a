"""Helpers for tests and benchmarks of the server: random prompts and a real uvicorn
server on a free 127.0.0.1 port, run in a background thread."""
from __future__ import annotations

import socket
import threading
import time

import torch

from ..core.prompts import ModelIdentity, SoftPrompt
from ..data.task import TaskKind


def random_prompt(
    model,
    template: str,
    *,
    kind: str = TaskKind.CLASSIFICATION,
    verbalizer: dict[str, str] | None = None,
    seed: int = 0,
    task: str = "",
    scale: float = 1.0,
) -> SoftPrompt:
    """A randomly initialised prompt for ``model`` (uniform in [-scale/2, scale/2])."""
    from ..core.templates import Template

    n = Template(template).n_soft
    ident = ModelIdentity.of(model)
    g = torch.Generator().manual_seed(seed)
    emb = (torch.rand(n, ident.hidden_size, generator=g) - 0.5) * scale
    return SoftPrompt(embeddings=emb, identity=ident, template=template, verbalizer=verbalizer, task=task, kind=kind)


class ServerThread:
    """``with ServerThread(app) as srv: httpx.get(srv.url + "/healthz")`` -- uvicorn on a
    free port of 127.0.0.1, stopped (gracefully) on exit; ``config``: more ``uvicorn.Config``
    keywords (e.g. ``http=`` for the protocol class)."""

    def __init__(self, app, *, log_level: str = "warning", timeout: float = 30.0, **config):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", backlog=2048,
                                                    **{"timeout_keep_alive": 30, **config}))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.timeout = timeout

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
        self.sock.close()


def error_of(response, status: int, code: str | None = None) -> dict:
    """Assert ``response`` is the server's JSON error with ``status`` (and ``code``); return the error."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]
