"""Waiting on the engine for an HTTP client: answers that give up when the client leaves
(its work is cancelled), and generations streamed as server-sent events."""
from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import StreamingResponse

from .engine import Engine, GenerateResult, ServeError
from .guard import err_type
from .jsonsafe import dumps_finite


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


def sse(obj) -> bytes:
    """One server-sent event; an object holding NaN or infinity becomes an error event (never ``NaN``)."""
    return f"data: {dumps_finite(obj) if not isinstance(obj, str) else obj}\n\n".encode()


class ClientGone(Exception):
    """The client disconnected before its answer was ready (its work has been cancelled)."""


async def _wait_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read already, so the next
    ASGI message is the disconnect; servers send it when the connection closes)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def gather(futures, request: Request | None = None):
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



def stream(engine: Engine, future_factory, *, make_chunk, make_final, stops: tuple[str, ...],
            trailer: str | None = None) -> StreamingResponse:
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
                    yield sse(make_chunk(safe[len(emitted):]))
                    emitted = safe
            try:
                res: GenerateResult = afut.result()
            except ServeError as e:
                yield sse({"error": {"code": e.code, "message": e.message, "type": err_type(e.status)}})
                return
            except Exception as e:  # noqa: BLE001
                yield sse({"error": {"code": "internal_error", "message": type(e).__name__, "type": "server_error"}})
                return
            if res.text.startswith(emitted) and len(res.text) > len(emitted):
                yield sse(make_chunk(res.text[len(emitted):]))
            yield sse(make_final(res))
            if trailer is not None:
                yield sse(trailer)
        finally:
            closed = True
            if not afut.done():
                afut.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
