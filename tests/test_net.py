"""core.net's BackgroundServer under the slow and idle connections an attacker opens, sent for real on
loopback: clients that drip their request headers, a flood of idle sockets past the connection cap,
and the streamed reply and kept-alive connection that must survive both rules."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from alpaca_forge.core.net import BackgroundServer, bind_listener

pytestmark = pytest.mark.integration

STREAM_CHUNKS = 6
STREAM_GAP_S = 0.5  # 6 chunks over 3 s: longer than every header timeout below


async def tiny_app(scope, receive, send) -> None:
    """`/stream`: an SSE-like reply, one chunk every STREAM_GAP_S; anything else: 200 "ok"."""
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/stream":
        for i in range(STREAM_CHUNKS):
            await asyncio.sleep(STREAM_GAP_S)
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


@contextlib.contextmanager
def serving(**limits) -> Iterator[BackgroundServer]:
    server = BackgroundServer(tiny_app, bind_listener("127.0.0.1", 0), name="test-net", **limits)
    assert server.wait_started()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def open_sockets(port: int, n: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            socks[-1].settimeout(None)  # a socket with a timeout waits in recv even when told not to
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_server(s: socket.socket) -> bool:
    """True once the server has closed `s` (an end of stream or a reset); never blocks. Data still
    unread is read and dropped, so that it cannot hide the end behind it."""
    try:
        while s.recv(65536, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def get(port: int, path: str = "/", timeout_s: float = 5) -> tuple[int, bytes, float]:
    """A normal client: status, body and seconds taken."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read(), time.perf_counter() - t0
    finally:
        conn.close()


REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: drip\r\nAccept: */*\r\n\r\n"


def test_clients_dripping_header_bytes_are_closed_while_others_are_answered():
    header_timeout_s = 2
    with serving(header_timeout_s=header_timeout_s) as server, open_sockets(server.port, 300) as socks:
        opened = time.perf_counter()
        answered = None
        byte = 0
        while time.perf_counter() - opened < header_timeout_s + 4:
            alive = [s for s in socks if not closed_by_server(s)]
            if not alive:
                break
            for s in alive:  # one header byte per client per second, never the end of the headers
                with contextlib.suppress(OSError):
                    s.send(REQUEST[byte : byte + 1])
            byte += 1
            if answered is None:
                answered = get(server.port)
            time.sleep(1)
        took_s = time.perf_counter() - opened
        assert alive == [], f"{len(alive)} of 300 dripping clients still open after {took_s:.1f} s"
        assert byte >= header_timeout_s, "closed before their time was up"
        assert server.limits.closed_slow >= 300
        status, body, seconds = answered
        assert (status, body) == (200, b"ok") and seconds < 2
        assert get(server.port)[:2] == (200, b"ok")


def test_a_flood_past_the_connection_cap_closes_the_oldest_idle_ones_not_new_clients():
    stream: dict[str, object] = {}

    def read_stream(port: int) -> None:
        stream["status"], stream["body"], _ = get(port, "/stream", timeout_s=10)

    # A long header deadline, so that only the cap can close the idle sockets.
    with serving(header_timeout_s=60, max_connections=50) as server:
        streaming = threading.Thread(target=read_stream, args=(server.port,))
        streaming.start()  # mid-answer all through the flood: never closed to make room
        time.sleep(0.3)
        with open_sockets(server.port, 200) as socks:
            status, body, seconds = get(server.port)
            assert (status, body) == (200, b"ok") and seconds < 2
            deadline = time.perf_counter() + 5
            while sum(map(closed_by_server, socks)) < 150 and time.perf_counter() < deadline:
                time.sleep(0.05)
            closed = [closed_by_server(s) for s in socks]
            assert sum(closed) >= 150, f"only {sum(closed)} of 200 idle sockets closed past a cap of 50"
            assert not any(closed[-40:]), "the newest connections were closed instead of the oldest"
            assert len(server.limits.open) <= 50
        streaming.join(10)
        assert stream == {
            "status": 200,
            "body": b"".join(f"data: {i}\n\n".encode() for i in range(6)) + b"ok",
        }


def test_a_streamed_reply_longer_than_the_header_timeout_completes_and_keep_alive_holds():
    with serving(header_timeout_s=1, keep_alive_s=5) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            t0 = time.perf_counter()
            conn.request("GET", "/stream")
            response = conn.getresponse()
            chunks = response.read()
            assert time.perf_counter() - t0 >= STREAM_CHUNKS * STREAM_GAP_S > 1
            assert response.status == 200 and chunks.count(b"data: ") == STREAM_CHUNKS
            time.sleep(1.5)  # idle past the header timeout, within keep-alive: the connection stays
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"ok"
            assert server.limits.closed_slow == 0
        finally:
            conn.close()


def test_the_next_request_on_a_kept_alive_connection_has_the_same_header_deadline():
    with serving(header_timeout_s=1, keep_alive_s=30) as server, open_sockets(server.port, 1) as (s,):
        s.sendall(REQUEST)
        response = b""
        while not response.endswith(b"0\r\n\r\n"):  # the whole (chunked) response: only the end is left
            chunk = s.recv(4096)
            assert chunk, f"closed in the middle of the response: {response!r}"
            response += chunk
        assert response.startswith(b"HTTP/1.1 200")
        t0 = time.perf_counter()
        for byte in REQUEST[:-2]:  # dripped; keep-alive (30 s) no longer guards it
            if closed_by_server(s):
                break
            with contextlib.suppress(OSError):
                s.send(bytes([byte]))
            time.sleep(0.2)
        assert closed_by_server(s) and time.perf_counter() - t0 < 4


def test_the_open_file_limit_is_raised_and_the_cap_kept_under_it():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 1024:
        pytest.skip(f"hard open-file limit {hard}: nothing to raise it to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        with serving() as server:
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
            assert server.limits.max_connections == min(1000, hard // 2)
            assert server.limits.header_timeout_s == 5
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------------------------------------
# core.http_body: a request's body, at most so many bytes within so many seconds


BODY_MAX_BYTES = 64
BODY_TIMEOUT_S = 1.0


async def body_app(scope, receive, send) -> None:
    """Echoes the body read through core.http_body, or answers its BodyError's status and message."""
    from starlette.requests import Request

    from alpaca_forge.core.http_body import BodyError, read_body

    try:
        status, reply = 200, await read_body(Request(scope, receive), BODY_MAX_BYTES, BODY_TIMEOUT_S)
    except BodyError as e:
        status, reply = e.status, e.message.encode()
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": reply, "more_body": False})


def post(port: int, body: object, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_body_is_read_whole_under_its_byte_cap_and_its_deadline():
    server = BackgroundServer(body_app, bind_listener("127.0.0.1", 0), name="test-net-body")
    assert server.wait_started()
    try:
        assert post(server.port, b'{"a": 1}') == (200, b'{"a": 1}')
        assert post(server.port, b"x" * BODY_MAX_BYTES) == (200, b"x" * BODY_MAX_BYTES)
        # refused on its declared length, before a byte of it is read
        status, message = post(server.port, None, {"content-length": "1000"})
        assert (status, message) == (413, b"the request body is 1,000 bytes; this server takes at most 64")
        # a chunked body declares none: counted as it comes
        status, message = post(server.port, iter([b"x" * 40, b"x" * 40]))
        assert status == 413 and b"over 64 bytes" in message
        # headers at once, then a body byte every 0.1 s: a 408 at the deadline, the rest unsent
        with open_sockets(server.port, 1) as (s,):
            s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n")
            s.settimeout(0.1)
            t0 = time.perf_counter()
            reply = b""
            for _ in range(50):
                with contextlib.suppress(TimeoutError):
                    reply = s.recv(4096)
                if reply:
                    break
                s.send(b"x")
            took_s = time.perf_counter() - t0
            s.settimeout(5)
            while not reply.endswith(b"0\r\n\r\n"):  # the whole (chunked) response
                chunk = s.recv(4096)
                assert chunk, f"closed in the middle of the response: {reply!r}"
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in reply
        assert BODY_TIMEOUT_S <= took_s < BODY_TIMEOUT_S + 1
    finally:
        server.stop()
