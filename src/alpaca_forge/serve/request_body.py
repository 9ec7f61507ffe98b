"""Reading a request's body: at most so many bytes, within so many seconds (core.http_body, shared
with the rating page), as UTF-8 JSON whose strings are all text. Each way a body can be wrong is a
400, 408 or 413 naming what is wrong."""

from __future__ import annotations

import json
import re
from typing import Any

from ..core.http_body import BodyError, read_body
from .protocol import ApiError

_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_json(request: Any, max_bytes: int, timeout_s: float) -> Any:
    """The body as JSON: at most `max_bytes` (413), all of it within `timeout_s` (408, so a
    client that sends half a request and hangs holds nothing but its own connection)."""
    try:
        raw = await read_body(request, max_bytes, timeout_s)
    except BodyError as e:
        # serve's codes as before (its tests pin them): body_timeout on a 408, none on a 400 or 413
        raise ApiError(e.status, e.message, code="body_timeout" if e.timed_out else None) from None
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ApiError(400, f"the request body cannot be read: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply to be read") from None
    # UTF-8 cannot carry a surrogate, so one can only come as a JSON escape ("\ud800"); a lone one
    # is no text (no tokenizer, log or reply can encode it), in whichever field it hides.
    if "\\u" in text:
        found = lone_surrogate_at(data)
        if found is not None:
            # the name itself may hold the surrogate (an object key): shown escaped, and short
            where = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", found)[:200]
            raise ApiError(
                400,
                f"{where}: holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), "
                "which is not text; send valid Unicode",
                param=where,
            )
    return data


def lone_surrogate_at(data: Any) -> str | None:
    """Where the first string (or object key) holding a lone surrogate is, named as OpenAI names a
    parameter (`messages[0].content`), or None. Walked without recursion: JSON may nest deeply."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            items = []
            for key, item in value.items():
                inner = f"{path}.{key}" if path else key
                if _SURROGATE.search(key):
                    return inner
                items.append((inner, item))
            todo.extend(reversed(items))  # popped in the order they were written
        elif isinstance(value, list):
            todo.extend(reversed([(f"{path}[{i}]", item) for i, item in enumerate(value)]))
    return None


async def wait_for_disconnect(request: Any) -> None:
    """Returns when the client closes its connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
