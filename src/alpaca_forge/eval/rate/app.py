"""The rating page's server: the page itself, and three calls it makes.

    GET  /api/next?rater=NAME               the rater's next unrated item: instruction, input and
                                            the two answers as Response A and B, with a token
    POST /api/rate {rater, item, verdict, token}   verdict "A", "B" or "tie", in those slots
    POST /api/undo {rater}                  take back the rater's latest rating

Blind: the systems' names (and their files' names) never leave the server. Which answer is
Response A is seeded per rater and item, half of each rater's items each way, so a rater's
preference for a slot cancels out instead of favouring a system. The token ties a verdict to
the pair this server handed out: a tab left open across a restart with another --seed, another
set or other answers cannot record its verdict on the wrong sides (the page gets 409 and shows
the item again). Every error is JSON, `{"error": {"message", "code"}}`, with a 4xx status. A
body is at most 16 KB (413) and all of it must come within 10 s of its headers (408), read as
`serve` reads its bodies (core.http_body).

Every route, the page and its static files included, passes one gate (`check_request`): served
on loopback, the Host must be a loopback name (a DNS-rebinding page sends its own); on any
address, a browser's Origin, when sent, must be this page's own (`null`, from a sandboxed frame or
a `file:` page, is another site's). A rater's sides are worked out from the seed and the name, so
only the latest raters' are kept (an LRU, about 7 MB at most): a flood of names costs time, not
memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ...core import http_body
from ...core.net import hostname_of
from ...judging.items import Item, System
from .config import LOOPBACK_NAMES
from .ratings import VERDICTS, Rating, RatingStore, check_rater, now

STATIC = resources.files("alpaca_forge.eval.rate") / "static"
MAX_BODY_BYTES = 16_384  # a verdict is a hundred bytes
# All of a body within this, from its headers: a client dripping one byte a second would hold its
# connection for good, and the connection cap never closes one in the middle of a request.
BODY_TIMEOUT_S = 10.0
BODY_ERROR_CODES = {400: "bad_length", 408: "body_timeout", 413: "too_large"}
STATIC_KINDS = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
NO_STORE = {"cache-control": "no-store"}  # a reload must ask again, never show a cached pair
# A rater's sides are a flag per item, about 26 bytes each (6.4 KB a rater on a 252-item set).
# Only the latest raters' are kept, this many flags in all (about 7 MB); another rater's are
# worked out again, the same, when they come back (0.2 ms on 252 items, 9 ms on 10,000).
SIDES_KEPT = 1 << 18


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "code": self.code}}


def a_first_sides(seed: int, rater: str, item_ids: Sequence[str]) -> dict[str, bool]:
    """item id -> whether system A is shown as Response A to this rater: half of the items each
    way (the odd one out by a coin), shuffled; the same for the same seed and rater every time,
    so a restarted server hands a rater the same sides."""
    rng = random.Random(f"eval-rate:{seed}:{rater}")  # a str seed is hashed stably (sha512)
    n = len(item_ids)
    flags = [True] * (n // 2) + [False] * (n // 2)
    if n % 2:
        flags.append(rng.random() < 0.5)
    rng.shuffle(flags)
    return dict(zip(item_ids, flags, strict=True))


class RateSession:
    """What the routes share: the set, the two systems, the store, each rater's sides."""

    def __init__(
        self,
        items: list[Item],
        a: System,
        b: System,
        store: RatingStore,
        *,
        seed: int,
        loopback_only: bool,
    ):
        self.items, self.a, self.b, self.store, self.seed = items, a, b, store, seed
        self.by_id = {it.id: it for it in items}
        self.loopback_only = loopback_only
        self._key = os.urandom(32)  # tokens of another server run are stale, by design
        # rater -> item -> A first, least recently used first; requests arrive on several threads
        self._sides: OrderedDict[str, dict[str, bool]] = OrderedDict()
        self._sides_lock = threading.Lock()
        self.raters_kept_at_most = max(1, SIDES_KEPT // max(1, len(items)))

    def pair(self, rater: str, item_id: str) -> tuple[System, System]:
        """(shown as Response A, shown as Response B) for this rater."""
        with self._sides_lock:
            sides = self._sides.get(rater)
            if sides is None:
                sides = self._sides[rater] = a_first_sides(self.seed, rater, [it.id for it in self.items])
                if len(self._sides) > self.raters_kept_at_most:
                    self._sides.popitem(last=False)
            else:
                self._sides.move_to_end(rater)
        return (self.a, self.b) if sides[item_id] else (self.b, self.a)

    @property
    def raters_kept(self) -> int:
        """Raters whose sides are held in memory now (at most `raters_kept_at_most`)."""
        with self._sides_lock:
            return len(self._sides)

    def token(self, rater: str, item_id: str, first: str, second: str) -> str:
        message = json.dumps([rater, item_id, first, second]).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]

    def progress(self, rater: str) -> dict[str, Any]:
        rated = self.store.rated(rater)
        return {"rater": rater, "total": len(self.items), "rated": sum(it.id in rated for it in self.items)}

    # -- the three calls

    def next_for(self, rater: str) -> dict[str, Any]:
        rated = self.store.rated(rater)
        # In the set's order, the same for every rater: raters who stop early overlap as much as
        # they can, which is what agreement between them is measured on.
        item = next((it for it in self.items if it.id not in rated), None)
        out = self.progress(rater) | {"done": item is None, "item": None}
        if item is not None:
            first, second = self.pair(rater, item.id)
            out["item"] = {
                "id": item.id,
                "instruction": item.instruction,
                "input": item.input,
                "response_a": first.answers[item.id],
                "response_b": second.answers[item.id],
                "token": self.token(rater, item.id, first.name, second.name),
            }
        return out

    def rate(self, rater: str, item_id: str, verdict: str, token: str) -> dict[str, Any]:
        first, second = self.pair(rater, item_id)
        # As bytes: compare_digest refuses a str with non-ASCII characters (a TypeError, a 500);
        # surrogatepass, because JSON can carry a lone surrogate ("\ud800") that UTF-8 cannot.
        given = token.encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(given, self.token(rater, item_id, first.name, second.name).encode()):
            raise ApiError(
                409,
                "this pair was not handed out by this server as it runs now (it restarted, or the "
                "page is old): nothing was recorded; load the item again",
                "stale_token",
            )
        rating = Rating(rater, item_id, first.name, second.name, verdict, now())  # type: ignore[arg-type]
        if not self.store.add(rating):
            raise ApiError(
                409,
                f"{rater} has rated item {item_id!r} already (in another tab?); undo it first to change it",
                "already_rated",
            )
        return self.progress(rater) | {"recorded": {"item": item_id, "verdict": verdict}}

    def undo(self, rater: str) -> dict[str, Any]:
        last = self.store.undo(rater)
        return self.progress(rater) | {"undone": last.item if last else None}


# ---------------------------------------------------------------------------------------------
# Checking a request


def _rater(value: Any) -> str:
    problem = check_rater(value)
    if problem is not None:
        shown = value[:60] if isinstance(value, str) else value
        raise ApiError(400, f"rater {shown!r}: {problem}", "bad_rater")
    return value


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not JSON", "bad_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "bad_json")
    return body


def check_request(session: RateSession, headers: Mapping[str, str]) -> None:
    """The gate every route passes. Served on loopback, only this machine may call: the Host must
    be a loopback name. On any address, not through another site's page: a browser's Origin, when
    sent, must be this page's own (its host and port are the Host's); `null` never is."""
    authority = headers.get("host") or ""
    if session.loopback_only:
        host = hostname_of(authority)
        if host not in LOOPBACK_NAMES:
            raise ApiError(
                403,
                f"this page answers requests to a loopback address only, not {host[:80]!r}",
                "host_not_allowed",
            )
    origin = headers.get("origin")
    if origin is None:
        return  # not a browser's cross-origin call: same-origin GETs, curl, the tests
    scheme, _, origin_authority = origin.partition("://")
    if scheme not in ("http", "https") or origin_authority.lower() != authority.lower():
        raise ApiError(403, f"cross-site request from {origin[:80]!r} refused", "origin_not_allowed")


# ---------------------------------------------------------------------------------------------
# The application


def create_app(session: RateSession) -> FastAPI:
    # No /docs: FastAPI's docs page loads its scripts from a CDN, and this page works offline.
    app = FastAPI(title="alpaca-forge rate", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: ApiError) -> Any:
        return JSONResponse(e.body(), status_code=e.status, headers=NO_STORE)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> Any:
        return error(exc)

    @app.middleware("http")
    async def gate(request: Request, call_next: Any) -> Any:
        # Here rather than in each route, so none can skip it: unknown paths and /static too.
        try:
            check_request(session, request.headers)
        except ApiError as e:
            return error(e)
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> Any:
        message = "no such page" if exc.status_code == 404 else str(exc.detail)
        return error(
            ApiError(exc.status_code, message, "not_found" if exc.status_code == 404 else "bad_request")
        )

    async def read_body(request: Request) -> dict[str, Any]:
        try:
            raw = await http_body.read_body(request, MAX_BODY_BYTES, BODY_TIMEOUT_S)
        except http_body.BodyError as e:
            raise ApiError(e.status, e.message, BODY_ERROR_CODES[e.status]) from None
        return _body(raw)

    @app.get("/")
    async def page() -> Any:
        return HTMLResponse((STATIC / "rate.html").read_text(encoding="utf-8"), headers=NO_STORE)

    @app.get("/static/{name}")
    async def static(name: str) -> Any:
        suffix = "." + name.rpartition(".")[2]
        item = STATIC / name
        if "/" in name or name.startswith(".") or suffix not in STATIC_KINDS or not item.is_file():
            raise ApiError(404, "no such file", "not_found")
        return Response(item.read_bytes(), media_type=STATIC_KINDS[suffix])

    @app.get("/api/next")
    async def next_item(request: Request) -> Any:
        rater = _rater(request.query_params.get("rater"))
        return JSONResponse(await run_in_threadpool(session.next_for, rater), headers=NO_STORE)

    @app.post("/api/rate")
    async def rate(request: Request) -> Any:
        body = await read_body(request)
        rater = _rater(body.get("rater"))
        verdict, item_id, token = body.get("verdict"), body.get("item"), body.get("token")
        if verdict not in VERDICTS:
            raise ApiError(400, f"verdict {verdict!r}: must be one of {', '.join(VERDICTS)}", "bad_verdict")
        if not isinstance(item_id, str) or item_id not in session.by_id:
            shown = item_id[:80] if isinstance(item_id, str) else item_id
            raise ApiError(404, f"item {shown!r} is not in this set", "unknown_item")
        if not isinstance(token, str):
            raise ApiError(400, "token: the token /api/next handed out with the item is missing", "bad_token")
        done = await run_in_threadpool(session.rate, rater, item_id, verdict, token)
        return JSONResponse(done, headers=NO_STORE)

    @app.post("/api/undo")
    async def undo(request: Request) -> Any:
        body = await read_body(request)
        rater = _rater(body.get("rater"))
        return JSONResponse(await run_in_threadpool(session.undo, rater), headers=NO_STORE)

    return app
