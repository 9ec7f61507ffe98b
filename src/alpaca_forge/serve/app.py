"""The HTTP routes of `alpaca-forge serve`, declared once, each a few lines: the gate first (every
route declares its `Door`; see `state.py`), then the server's `Serving`, kept on `app.state`.

No route is without a gate: `create_app` refuses to build an app where one is.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from .planning import plan_chat, plan_completion
from .protocol import ApiError, ChatRequest, CompletionRequest
from .serving import Serving
from .state import Admitted, Door, ServerState


class Gate:
    """The dependency every route declares: `ServerState.admit` with the route's door."""

    def __init__(self, door: Door):
        self.door = door

    async def __call__(self, request: Request) -> Admitted:
        return request.app.state.forge.admit(request, self.door)


def _serving(request: Request) -> Serving:
    return request.app.state.serving


# The page, its files, /health and /metrics: no key, and the loopback rule of a keyless server.
PUBLIC = Depends(Gate(Door()))
MODELS = Depends(Gate(Door(key=True, ready=True)))
CHAT = Depends(Gate(Door(key=True, ready=True, endpoint="chat/completions")))
COMPLETIONS = Depends(Gate(Door(key=True, ready=True, endpoint="completions")))
# the filter (its judge, too) is set up with the model: it needs the model loaded as well
MODERATIONS = Depends(Gate(Door(key=True, ready=True, endpoint="moderations")))

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, admitted: Admitted = CHAT) -> Any:
    return await _serving(request).answer(request, admitted, ChatRequest, plan_chat)


@router.post("/v1/completions")
async def completions(request: Request, admitted: Admitted = COMPLETIONS) -> Any:
    return await _serving(request).answer(request, admitted, CompletionRequest, plan_completion)


@router.post("/v1/moderations")
async def moderations(request: Request, admitted: Admitted = MODERATIONS) -> Any:
    return await _serving(request).moderations(request, admitted)


@router.get("/v1/models")
async def models(request: Request, admitted: Admitted = MODELS) -> Any:
    return _serving(request).models(admitted)


@router.get("/health", dependencies=[PUBLIC])
async def health(request: Request) -> Any:
    return _serving(request).health()


@router.get("/metrics", dependencies=[PUBLIC])
async def metrics(request: Request) -> Any:
    return _serving(request).metrics()


@router.get("/", dependencies=[PUBLIC])
async def page(request: Request) -> Any:
    return _serving(request).page()


@router.get("/static/{name}", dependencies=[PUBLIC])
async def static(request: Request, name: str) -> Any:
    return _serving(request).static(name)


def gates_of(route: APIRoute) -> list[Gate]:
    return [d.call for d in route.dependant.dependencies if isinstance(d.call, Gate)]


def create_app(state: ServerState) -> Any:
    # No /docs: FastAPI's docs page loads its scripts from a CDN, and this server works offline.
    app = FastAPI(title="alpaca-forge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.forge = state
    app.state.serving = serving = Serving(state)
    ungated = [
        getattr(r, "path", repr(r))
        for r in router.routes
        if not isinstance(r, APIRoute) or len(gates_of(r)) != 1
    ]
    if ungated:
        raise RuntimeError(f"routes without exactly one gate: {ungated}")
    app.include_router(router)

    @app.exception_handler(ApiError)
    async def _refused(_request: Request, exc: ApiError) -> Any:
        return serving.error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> Any:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return serving.error_response(ApiError(exc.status_code, message))

    return app
