"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for request headers and a cap on open connections.

uvicorn times a connection out only while it sits idle between two requests (keep-alive). A client
that opens a connection and sends its request line and headers one byte a second holds a socket,
and a file descriptor, for as long as it likes, before any route (and so any API key check) sees
it; a few thousand of them use up the process's file limit, and honest clients time out.

Here a connection has `header_timeout_s` from its opening, or from the first byte of its next
request on a kept-alive connection, to the end of its request headers. A server keeps at most
`max_connections` open: a connection past that closes the oldest one that is not in the middle of
a request (still sending its headers, or idle between requests), so a flood of idle sockets makes
room for the newest client instead of locking it out. Once its headers are in, a request is never
cut by either rule: a streamed reply that runs for minutes finishes.

This leans on three things of `H11Protocol` beyond `asyncio.Protocol`: its constructor's keywords,
`on_response_complete()` (called when a response has been sent) and `cycle` (a new object for
each request whose headers are complete); the tests in tests/test_net.py pin all three.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("alpaca_forge")


class ConnectionLimits:
    """One server's rules and its connections; touched only from the server's event loop, so
    without a lock."""

    def __init__(self, header_timeout_s: float, max_connections: int):
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.open: set[GuardedH11Protocol] = set()
        # Connections not in the middle of a request, oldest first (a dict keeps insertion order).
        self.waiting: dict[GuardedH11Protocol, None] = {}
        self.closed_slow = 0  # closed because their headers missed the deadline
        self.closed_for_room = 0  # closed to stay under max_connections

    def make_room(self) -> None:
        """Close the oldest waiting connections while more than `max_connections` are open (the
        newest one too, when every other connection is answering a request)."""
        while len(self.open) > self.max_connections and self.waiting:
            oldest = next(iter(self.waiting))
            if not self.closed_for_room:
                log.warning(
                    "%d connections open: closing the oldest idle ones to make room for new ones",
                    len(self.open),
                )
            self.closed_for_room += 1
            self.open.discard(oldest)  # at once: the transport reports its end on a later loop turn
            oldest.drop()


class GuardedH11Protocol(H11Protocol):
    """A connection under its server's `ConnectionLimits`."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.limits.open.add(self)
        self._start_waiting(deadline=True)
        self.limits.make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self.limits.open.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self in self.limits.waiting and self._header_deadline is None:
            # The first bytes of the next request on a kept-alive connection: uvicorn stops its
            # keep-alive timer here, so the headers' deadline takes over.
            self._arm_deadline()
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # the request's headers are complete
            self._stop_waiting()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()  # may parse a request that was pipelined behind this one
        if self.cycle is cycle and not self.transport.is_closing():
            self._start_waiting(deadline=False)  # idle: uvicorn's keep-alive timer runs

    def drop(self) -> None:
        self._stop_waiting()
        if not self.transport.is_closing():
            self.transport.close()

    def _start_waiting(self, *, deadline: bool) -> None:
        self.limits.waiting[self] = None
        if deadline:
            self._arm_deadline()

    def _stop_waiting(self) -> None:
        self.limits.waiting.pop(self, None)
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _arm_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.limits.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._header_deadline = None
        self.limits.closed_slow += 1
        self.drop()
