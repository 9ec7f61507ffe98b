"""Serving an ASGI app (serve's API, eval's rating page) from a background thread.

The socket is bound before the thread starts, so a port in use is a clear error at once, and
port 0 gives a free port whose number is known before the first request. The end of the server
thread is signalled by an Event, never read from `Thread.join`: after Ctrl-C interrupts a join,
CPython (3.11) reports the thread stopped while it still runs, and closing the socket under a
live uvicorn then fails with a traceback.

Both servers face clients before any key is checked, so each connection is held to a deadline for
its request headers and the server to a cap on open connections (`core/http_guard.py` says how);
the process's open-file limit is raised to its hard limit, and the cap kept well under it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .errors import UserError

log = logging.getLogger("alpaca_forge")

EADDRINUSE = 98
# What to assume where the open-file limit is unknown or unlimited (then the cap is 1000 anyway).
ASSUMED_FILE_LIMIT = 1 << 16


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; the limit now in force."""
    try:
        import resource
    except ImportError:  # not on this system (Windows): leave it
        return ASSUMED_FILE_LIMIT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):  # a sandbox may refuse it: keep the old one
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else ASSUMED_FILE_LIMIT


def hostname_of(authority: str) -> str:
    """The name part of a `Host` header or an origin's authority ("[::1]:8000" -> "::1"); "" when
    it cannot be read."""
    try:
        return urlsplit("//" + authority).hostname or ""
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address
        return ""


def bind_listener(host: str, port: int, *, backlog: int = 2048) -> socket.socket:
    """A listening socket, or a clear error for a port in use or an address this machine lacks."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a name such as localhost
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == EADDRINUSE:
            raise UserError(
                f"--port {port}: already in use on {host}", "stop the other server, or pick another --port"
            ) from e
        raise UserError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e})", "check --host"
        ) from e
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class BackgroundServer:
    """`app` served by uvicorn on `sock` from a daemon thread, until `stop()`.

    `keep_alive_s`: how long a connection may sit idle between requests. `header_timeout_s`: how
    long a client has to send a request's line and headers, from opening the connection (or from
    the next request's first byte). `max_connections`: open connections at most (held under half
    the open-file limit); past it the oldest connection that is idle or still sending headers is
    closed. A request whose headers are in is never cut by these (its body has the app's limits).
    """

    def __init__(
        self,
        app: Any,
        sock: socket.socket,
        *,
        name: str,
        keep_alive_s: float = 5,
        graceful_shutdown_s: float = 5,
        header_timeout_s: float = 5,
        max_connections: int = 1000,
    ):
        import uvicorn

        from .http_guard import ConnectionLimits, GuardedH11Protocol

        # Half the open-file limit at most: the other half is room for what is not a client (the
        # model's files, the request log, pipes, the listening socket), so accept() never fails.
        self.limits = ConnectionLimits(header_timeout_s, min(max_connections, raise_open_file_limit() // 2))
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.port = port
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        config = uvicorn.Config(
            app,
            http=functools.partial(GuardedH11Protocol, limits=self.limits),
            ws="none",  # neither server speaks WebSocket: an upgrade request is answered as plain HTTP
            log_level="warning",
            access_log=False,
            timeout_keep_alive=keep_alive_s,
            timeout_graceful_shutdown=graceful_shutdown_s,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self.sock])
        finally:
            self._ended.set()

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    @property
    def running(self) -> bool:
        return not self._ended.is_set()

    def wait_started(self) -> bool:
        """Block until uvicorn listens; False if it ended instead."""
        while not self.started and not self._ended.is_set():
            time.sleep(0.01)
        return not self._ended.is_set()

    def wait(self) -> None:
        """Block until the server ends (Ctrl-C in the caller's thread raises KeyboardInterrupt)."""
        while not self._ended.wait(0.5):
            pass

    def stop(self, timeout_s: float = 10) -> None:
        self._server.should_exit = True
        self._ended.wait(timeout_s)
        with contextlib.suppress(OSError):  # uvicorn closes it, unless it never started
            self.sock.close()


def until_interrupted(wait: Callable[[], None]) -> None:
    """Run `wait()` until it returns or Ctrl-C / SIGTERM (`kill PID` stops as cleanly as Ctrl-C)."""

    def stop_on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        if main:
            signal.signal(signal.SIGTERM, stop_on_term)
        wait()
    except KeyboardInterrupt:
        log.info("stopping ...")
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
