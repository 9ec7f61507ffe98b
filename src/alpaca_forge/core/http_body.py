"""Reading an HTTP request's raw body with two limits, shared by both web servers (`serve` and
`eval rate`): at most so many bytes, all of them within so many seconds.

The deadline is the part a server cannot do without. core.http_guard times a client out only
until its headers are in; from then on the connection belongs to the request, and the connection
cap never closes it. A client that sends its headers at once and then its body one byte a second
would hold its connection for good, and a thousand of them lock everyone else out.

Each server turns a `BodyError` into its own error shape; the status and message are the same.
"""

from __future__ import annotations

import asyncio
from typing import Any


class BodyError(Exception):
    """Why a body was refused: `status` 400 (a Content-Length that is no number), 408 (not all
    of it within the deadline) or 413 (more bytes than allowed), and a message naming it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    @property
    def timed_out(self) -> bool:
        return self.status == 408


async def read_body(request: Any, max_bytes: int, timeout_s: float) -> bytes:
    """`request`'s (a starlette Request's) whole body: at most `max_bytes` (413, refused on its
    declared Content-Length before a byte is read), all of it within `timeout_s` from this call
    (408, so a client that sends half a body and hangs holds nothing but its own connection)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BodyError(400, f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > max_bytes:
            raise BodyError(
                413, f"the request body is {int(declared):,} bytes; this server takes at most {max_bytes:,}"
            )
    chunks: list[bytes] = []
    size = 0

    async def gather() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            # a chunked body declares no length: counted as it comes
            if size > max_bytes:
                raise BodyError(
                    413, f"the request body is over {max_bytes:,} bytes, the most this server takes"
                )
            chunks.append(chunk)

    try:
        await asyncio.wait_for(gather(), timeout_s)
    except TimeoutError:
        raise BodyError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)
