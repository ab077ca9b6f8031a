"""uvicorn's h11 connection with a deadline on every request head.

uvicorn closes an idle keep-alive connection, but any byte resets that timer and nothing
bounds a fresh connection or a head that trickles in: a client that sends one header byte
every few seconds holds its connection (and a slot of ``--max-connections``) forever.
:class:`HeadTimeoutProtocol` closes a connection whose request head is not complete within
``header_timeout`` seconds of the connection's start or of the end of the previous
response.  Bodies are bounded by the guard (``guard.py``), which reads them.
"""
from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1000

_BODY = json.dumps({"error": {"code": "request_timeout", "type": "invalid_request_error",
                              "message": "the request head was not received in time"}}).encode()
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class HeadTimeoutProtocol(H11Protocol):
    """An :class:`H11Protocol` whose request heads must arrive within ``header_timeout`` s."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        # part of a head is buffered: say why before closing (never on an idle keep-alive
        # connection, where a client could take an unasked-for 408 as its next answer)
        partial = self.conn.their_state is h11.IDLE and self.conn.our_state in (h11.IDLE, h11.DONE) \
            and bool(self.conn.trailing_data[0])
        if partial:
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a new request head was parsed: its body and answer are not timed here
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        # armed before the base class runs: it may parse a pipelined head at once (and cancel)
        if not self.transport.is_closing():
            self._arm_head_timer()
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def http_limits_problem(header_timeout: float, body_timeout: float, min_body_rate: float,
                        max_connections: int) -> str | None:
    """What is wrong with these HTTP-layer limits (None: nothing), checked before a model loads."""
    if not (header_timeout > 0 and body_timeout > 0):
        return f"header and body timeouts must be > 0 seconds, got {header_timeout} and {body_timeout}"
    if not min_body_rate >= 0:
        return f"min_body_rate must be >= 0 bytes/s, got {min_body_rate}"
    if not max_connections >= 1:
        return f"max_connections must be >= 1, got {max_connections}"
    return None


def http_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> type[HeadTimeoutProtocol]:
    """The protocol class to pass as ``uvicorn.run(..., http=)`` for this ``header_timeout``."""
    if not header_timeout > 0:
        raise ValueError(f"header_timeout must be > 0 seconds, got {header_timeout}")
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"header_timeout": float(header_timeout)})
