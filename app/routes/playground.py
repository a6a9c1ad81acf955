"""The web playground (GET /, app/static/) and the engine snapshot its live panel polls.

The page is three files shipped inside the package: no CDN, no build step, nothing fetched at run
time. It is served with a Content Security Policy that allows only our own script and style and
connections back to this server, so model text (always inserted as text, never as HTML) cannot run.
The page itself is open; everything it reads or generates goes through the API key like any client.
"""

from __future__ import annotations

import time
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from app.engine import Engine
from app.errors import APIError
from app.routes.generation import server_state

router = APIRouter()  # the page and its assets (--no-playground leaves them out)
engine_router = APIRouter()

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a restarted server may ship a new page
}
# Pages poll twice a second; however many are open, the engine is asked at most five times a second.
SNAPSHOT_MAX_AGE_S = 0.2
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}


@cache
def asset(name: str) -> bytes:
    return resources.files("app").joinpath("static", name).read_bytes()


@router.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(asset("playground.html"), headers=PAGE_HEADERS)


@router.get("/playground/{name}", include_in_schema=False)
async def playground_asset(name: str) -> Response:
    if name not in ASSETS:
        raise APIError(404, f"No playground asset {name!r}.", code="not_found")
    return Response(asset(name), media_type=ASSETS[name], headers=PAGE_HEADERS)


@engine_router.get("/engine/snapshot", summary="The engine now and over the last minute (the playground's live panel polls it)")
async def engine_snapshot(request: Request) -> dict[str, Any]:
    """Every slot (free, prefilling, decoding; tokens in its cache; the request in it; the prefix a free
    slot keeps), the queue, and the last minute: tok/s and step time per second, a TTFT histogram."""
    state = server_state(request)
    engine = state.require_engine()
    now = time.monotonic()
    built, snapshot = getattr(request.app.state, "engine_snapshot", (0.0, None))
    if snapshot is None or now - built > SNAPSHOT_MAX_AGE_S:
        snapshot = snapshot_of(engine)
        request.app.state.engine_snapshot = (now, snapshot)
    return {"model": state.model_name, "phase": state.phase, **snapshot}


def snapshot_of(engine: Engine) -> dict[str, Any]:
    """Built from what the engine keeps anyway; takes the engine's lock only to copy the running set
    (bench/engine_snapshot.py measures what a poller costs the engine)."""
    stats = engine.stats()
    slots = engine.slots_snapshot()
    return {
        "time": time.time(),
        "max_batch_size": engine.max_batch_size,
        "max_seq_len": engine.max_seq_len,
        "running": stats.running,
        "waiting": stats.waiting,
        "max_queue": engine.max_queue,
        "totals": {
            "prompt_tokens": stats.prompt_tokens_total,
            "generated_tokens": stats.generated_tokens_total,
            "steps": stats.steps,
        },
        "prefix_cache": slots["prefix_cache"],
        "slots": slots["slots"],
        "last_minute": engine.telemetry.summary(),
    }
