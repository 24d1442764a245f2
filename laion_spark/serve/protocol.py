"""uvicorn's httptools protocol with two guards against slow or hoarding clients (slowloris).

Why: uvicorn times out only an idle keep-alive connection between requests. A connection that
sends nothing, half a request line, headers without their blank line, or a body slower than its
Content-Length promises was held open for ever (measured: 25 s and counting), so about a
thousand of them (the usual 1,024 descriptors per process) left every other client unanswered.

- `serve.request_read_timeout_s`: from a connection's opening, or from the first byte of a later
  request on it, to the end of that request's body; over it the server answers 408 (unless a
  response already started) and closes.
- `serve.max_header_bytes`: a request line and headers together (httptools has no cap: one
  connection streaming a header grew the worker by over 1 GB in 8 s); over it 431 and closed,
  checked after each read (asyncio reads up to 256 KiB at a time).
- `serve.write_stall_timeout_s`: a client that stops reading its answers held the connection
  and the unsent bytes for ever (uvicorn waits on the drain with no deadline); a write paused
  that long without draining aborts the connection.
- `serve.max_connections_per_client`: open connections one client address may hold in a worker;
  a connection over it gets 503 and is closed at once. Behind a reverse proxy every client has
  the proxy's address: raise it or set 0 (no cap).

Set per worker process by `configure` (the app factory calls it with the worker's ServeConfig).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from laion_spark.config import ServeConfig

log = logging.getLogger(__name__)

# uvicorn's `http=` for `laion-spark serve` (a string: each worker process imports it)
UVICORN_HTTP = "laion_spark.serve.protocol:GuardedHttpTools"


def _answer(status: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: 0\r\nconnection: close\r\n\r\n")


class GuardedHttpTools(HttpToolsProtocol):
    """HttpToolsProtocol plus a request read deadline and a per-client connection cap."""

    read_timeout_s: float = 10.0
    max_head_bytes: int = 65_536
    max_per_client: int = 64
    stall_timeout_s: float = 30.0

    @classmethod
    def configure(cls, cfg: ServeConfig) -> None:
        cls.read_timeout_s, cls.max_head_bytes = cfg.request_read_timeout_s, cfg.max_header_bytes
        cls.max_per_client = cfg.max_connections_per_client
        cls.stall_timeout_s = cfg.write_stall_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: Optional[asyncio.TimerHandle] = None
        self._stall_timer: Optional[asyncio.TimerHandle] = None
        self._head_bytes: Optional[int] = 0  # None while a body is read
        # open connections per client address, per server (uvicorn's state of this listener)
        if not hasattr(self.server_state, "open_by_client"):
            self.server_state.open_by_client = {}
        self._open = self.server_state.open_by_client
        self._host = self.client[0] if self.client else None
        held = self._open.get(self._host, 0)
        if self._host is not None and 0 < self.max_per_client <= held:
            log.warning("serve: %s holds %d connections, the limit; refused", self._host, held)
            self._host = None  # not counted
            transport.write(_answer(b"503 Service Unavailable"))
            transport.close()
            return
        if self._host is not None:
            self._open[self._host] = held + 1
        self._arm()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._host is not None:
            left = self._open.get(self._host, 1) - 1
            if left > 0:
                self._open[self._host] = left
            else:
                self._open.pop(self._host, None)
            self._host = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is None:
            super().data_received(data)
            return
        self._head_bytes += len(data)
        super().data_received(data)
        if self._head_bytes is not None and self._head_bytes > self.max_head_bytes and \
                not self.transport.is_closing():
            self._disarm()
            self.transport.write(_answer(b"431 Request Header Fields Too Large"))
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._read_timer is None:  # a later request on a kept-alive connection
            self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        self._head_bytes = 0  # the next request's head
        super().on_message_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stall_timeout_s > 0 and self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.stall_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        super().resume_writing()

    def _write_stalled(self) -> None:
        self._stall_timer = None
        log.info("serve: %s stopped reading for %.0f s; connection aborted", self.client,
                 self.stall_timeout_s)
        self.transport.abort()

    def _arm(self) -> None:
        if self.read_timeout_s > 0:
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_too_slow)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_too_slow(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle  # the previous request's while a later one's headers are read
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_answer(b"408 Request Timeout"))
        self.transport.close()
