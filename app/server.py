"""The FastAPI app: wires settings, lifecycle, middleware and the routers together.

`create_app(settings, loaded=None)` builds one app. The model loads in the background after start-up
(or is injected by tests), then a short warm-up generation runs, then /health turns 200 (lifecycle.py).
A request passes the middleware (middleware.py: request id, CORS, API key, body limit), then its route
(routes/): the body is parsed into a wire model (protocol/requests.py), mapped to engine requests,
submitted (every choice before the response starts, so validation errors are plain 4xx), and the
engine's outputs come back through one fan-in as JSON or SSE (streaming.py). After the 200 of a
stream, errors travel as an SSE `error` event.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.config import Settings
from app.errors import install_error_handlers
from app.lifecycle import ServerState
from app.middleware import REQUEST_ID_HEADER, APIKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from app.routes import chat, completions, info, playground
from app.routes.openapi_docs import install_schemas
from model.checkpoint import LoadedModel


def create_app(settings: Settings | None = None, loaded: LoadedModel | None = None) -> FastAPI:
    """One app with its own engine and metrics registry; `loaded` skips checkpoint loading (tests)."""
    settings = settings or Settings()
    state = ServerState(settings, loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.ensure_future(state.start())
        try:
            yield
        finally:
            if not starting.done():
                starting.cancel()
            await state.drain()

    app = FastAPI(  # no trailing-slash redirects: an unknown path is a 404 in the envelope, as OpenAI answers
        title="llamaserve",
        summary="OpenAI-compatible completions and chat for Llama-family models",
        lifespan=lifespan,
        redoc_url=None,
        redirect_slashes=False,
    )
    app.state.server = state
    install_error_handlers(app)
    # Outermost last: CORS answers preflights, then the key is checked before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, read_timeout=settings.read_timeout)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER],  # so browser clients can read it
        )
    app.add_middleware(RequestIdMiddleware)
    for module in (info, completions, chat):
        app.include_router(module.router)
    app.include_router(playground.engine_router)  # the snapshot is useful without the page (scripts, dashboards)
    if settings.playground:
        app.include_router(playground.router)
    install_schemas(app)
    return app
