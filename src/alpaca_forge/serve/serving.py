"""What each route does once the gate has let its request in, as one class kept on `app.state`
(the routes in `app.py` are a few lines each). An answer goes:

    body: size (413), time (408), UTF-8 JSON of text (400) -> fields (400) -> model name (404)
    -> token limits (400) -> input filter (refusal) -> queue (429) -> engine, with the output
    filter on each piece -> answer or SSE stream -> request log and metrics

Every refusal is OpenAI's error shape with the right status, and nothing a client sends reaches
the engine before all of it was checked: one client's bad request costs the others nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .backend import Backend
from .gate import Ticket
from .planning import Plan
from .protocol import ApiError, ModerationRequest, new_id, parse
from .request_body import read_json
from .responder import Responder, engine_error
from .state import Admitted, ServerState
from .telemetry import RequestRecord

STATIC = resources.files("alpaca_forge.serve") / "static"
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}

Planner = Callable[[ServerState, Backend, Any, RequestRecord], Awaitable[Plan]]


class Serving:
    """The server's answers, over its shared state."""

    def __init__(self, state: ServerState):
        self.state = state

    def error_response(self, e: ApiError) -> Any:
        headers = {**e.headers(), **self.state.identity_headers()}
        if e.status == 408:  # the client went quiet mid-body: this connection cannot go on
            headers["connection"] = "close"
        # (a 413 keeps the connection: the server reads and drops the rest of the body, so the
        # client, still sending, gets the answer instead of a reset)
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def answer(self, request: Any, admitted: Admitted, model: type, planner: Planner) -> Any:
        """A chat or a text completion: planned, queued, generated, as JSON or as SSE."""
        state, cfg = self.state, self.state.config
        started, rec, backend = admitted.started, admitted.rec, admitted.backend
        assert (
            rec is not None and backend is not None
        )  # the door of an answer has an endpoint and needs the model
        ticket: Ticket | None = None
        responder: Responder | None = None
        streaming = False
        try:
            req = parse(model, await read_json(request, cfg.max_body_bytes, cfg.body_timeout_s))
            rec.model, rec.stream = req.model, req.stream
            if req.model not in backend.aliases:
                raise ApiError(
                    404,
                    f"the model {req.model[:100]!r} does not exist here; this server serves {backend.name!r}",
                    param="model",
                    code="model_not_found",
                )
            plan = await planner(state, backend, req, rec)
            rec.prompt_tokens = plan.prompt_tokens
            if plan.blocked is None:
                ticket = state.admission.enter(len(plan.starts))
            responder = Responder(state, backend, plan, started)
            headers = state.identity_headers()
            if req.stream:
                streaming = True
                headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
                return StreamingResponse(
                    responder.sse(ticket), media_type="text/event-stream", headers=headers
                )
            body = await responder.whole(request, ticket)
            return JSONResponse(body, headers=headers)
        except Exception as e:  # a UserError is a 400; anything else a logged 500, in OpenAI's shape
            err = engine_error(e)
            rec.status, rec.error = err.status, err.message
            return self.error_response(err)
        finally:
            if not streaming:
                if ticket:
                    ticket.leave()
                if responder is not None:
                    responder.log_when_settled()
                else:
                    state.finish(rec, started)

    async def moderations(self, request: Any, admitted: Admitted) -> Any:
        """The content filter itself, in OpenAI's moderation shape."""
        state, cfg = self.state, self.state.config
        rec = admitted.rec
        assert rec is not None  # the door of /v1/moderations has an endpoint
        try:
            req = parse(ModerationRequest, await read_json(request, cfg.max_body_bytes, cfg.body_timeout_s))
            if state.filter is None:
                raise ApiError(
                    404, "the content filter is off on this server (--no-filter)", code="filter_off"
                )
            ticket = state.admission.enter(1)  # a slow moderation layer holds a place like an answer
            try:
                results = await asyncio.wait_for(
                    state.checking(state.filter.moderations, req.texts), cfg.request_timeout_s
                )
            except TimeoutError:
                raise ApiError(
                    504, f"no verdict within {cfg.request_timeout_s:g} s", code="timeout"
                ) from None
            finally:
                ticket.leave()
            for r in results:
                if r.get("flagged"):
                    hit = [c for c, v in r.get("categories", {}).items() if v]
                    rec.filter_hits.append({"stage": "moderation", "source": "api", "categories": hit})
            return JSONResponse({"id": new_id("modr"), "model": "alpaca-forge-filter", "results": results})
        except Exception as e:
            err = engine_error(e)
            rec.status, rec.error = err.status, err.message
            return self.error_response(err)
        finally:
            state.finish(rec, admitted.started)

    def models(self, admitted: Admitted) -> Any:
        backend = admitted.backend
        assert backend is not None  # the door of /v1/models needs the model
        card = {
            "id": backend.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "alpaca-forge",
            "prompt_format": backend.prompt_format,
            "fingerprint": backend.fingerprint,
            "context_tokens": backend.context_tokens,
            "max_tokens": self.state.config.max_tokens,
            # what a request that leaves a setting out gets (empty on a gateway: the server
            # behind's), and what of it the model's own generation config set
            "defaults": backend.api_defaults(self.state.config.max_tokens),
            "generation_config": backend.api_defaults(self.state.config.max_tokens, model_only=True),
        }
        return JSONResponse({"object": "list", "data": [card]}, headers=self.state.identity_headers())

    def health(self) -> Any:
        state = self.state
        if state.backend is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse(
                {"status": status, "error": state.load_error}, status_code=503, headers={"retry-after": "5"}
            )
        return JSONResponse({"status": "ok", "model": state.backend.model_id})

    def metrics(self) -> Any:
        data, content_type = self.state.metrics.render()
        return Response(data, media_type=content_type)

    def page(self) -> Any:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    def static(self, name: str) -> Any:
        suffix = "." + name.rpartition(".")[2]
        item = STATIC / name
        if "/" in name or name.startswith(".") or suffix not in _STATIC_TYPES or not item.is_file():
            return self.error_response(ApiError(404, "no such file"))
        return Response(item.read_bytes(), media_type=_STATIC_TYPES[suffix])
