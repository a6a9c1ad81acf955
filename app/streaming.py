"""Getting engine outputs to the client: one fan-in over every choice, SSE framing and keep-alives.

All choices of one HTTP request share one output queue (Engine.submit's `queue`), so their outputs
arrive here in the order the engine made them, through no second queue. A plain response drains the
fan-in while watching for its client to leave; a stream turns it into SSE events, with a keep-alive
comment whenever nothing was sent for `keepalive_s` (proxies close idle connections).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.engine import EngineDraining, GenerationOutput
from app.engine.handle import OutputQueue
from app.errors import APIError, from_engine_error, internal_error
from app.metrics import Metrics
from app.routes.choices import Choice

log = logging.getLogger("llamaserve")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it
DISCONNECT_POLL_S = 0.25  # how often a plain (non-streaming) request checks that its client is still there
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
KEEPALIVE = ": keepalive\n\n"  # an SSE comment: clients ignore it, proxies see traffic


async def fan_in(
    choices: list[Choice], queue: OutputQueue, idle_s: float | None = None
) -> AsyncIterator[tuple[Choice, GenerationOutput] | None]:
    """(choice, output) as the engine sends them until every choice has ended; None after `idle_s`
    seconds without one (time for a keep-alive). Raises the failure of a choice that failed."""
    by_handle = {id(c.handle): c for c in choices}
    remaining = len(choices)
    while remaining:
        try:
            handle, item = await asyncio.wait_for(queue.get(), idle_s)
        except asyncio.TimeoutError:
            yield None
            continue
        output = handle.settle(item)
        if handle.done:
            remaining -= 1
        if output is not None:
            yield by_handle[id(handle)], output


async def collect(choices: list[Choice], queue: OutputQueue, request: Request, metrics: Metrics) -> bool:
    """Fold every output into its Choice; False (all cancelled) if the client went away first."""

    async def consume() -> None:
        async for item in fan_in(choices, queue):
            assert item is not None
            item[0].add(item[1], metrics)

    async def client_gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    consumer, watcher = asyncio.ensure_future(consume()), asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            consumer.result()  # an engine failure propagates
            return True
        log.info("%s: client disconnected: cancelling %d choice(s)", request.state.request_id, len(choices))
        return False
    finally:
        consumer.cancel()
        watcher.cancel()
        abort_all(choices, metrics)


def abort_all(choices: list[Choice], metrics: Metrics) -> None:
    for choice in choices:
        choice.abort(metrics)


class SSEResponse(StreamingResponse):
    """An SSE stream that always runs its cleanup (cancel the handles), however the stream ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(data: Any) -> str:
    """One SSE event: a JSON payload (or the literal [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"


def error_event(exc: BaseException, rid: str) -> str:
    """After the 200 an error can only travel as an event: the error envelope, in `data:`."""
    api = exc if isinstance(exc, APIError) else from_engine_error(exc) if isinstance(exc, Exception) else None
    if api is None:
        log.error("%s: stream failed after the response started: %r", rid, exc)
        api = internal_error()
    else:
        log.info("%s: stream ended with an error event: %d %s", rid, api.status, api.message)
    return sse(api.body())


class StreamWriter(Protocol):
    """What an endpoint says in its stream; sse_stream adds the frame around it."""

    def start(self) -> list[str]: ...

    def output(self, choice: Choice, output: GenerationOutput) -> list[str]: ...

    def end(self) -> list[str]: ...


async def sse_stream(
    writer: StreamWriter, choices: list[Choice], queue: OutputQueue, metrics: Metrics, keepalive_s: float, rid: str
) -> AsyncIterator[str]:
    """The frame every stream shares: the writer's events, keep-alives while idle, then [DONE]. An
    engine failure mid-stream, or a drain that cuts the stream (code `server_draining`), becomes an
    error event before [DONE]."""
    try:
        for event in writer.start():
            yield event
        async for item in fan_in(choices, queue, keepalive_s):
            if item is None:
                yield KEEPALIVE
                continue
            choice, output = item
            choice.add(output, metrics)
            cut = output.finish_reason == "abort"  # the drain ran out of time: the text so far, then an error
            for event in writer.output(choice, replace(output, finish_reason=None) if cut else output):
                yield event
            if cut:
                yield error_event(EngineDraining("the server is shutting down"), rid)
                yield sse("[DONE]")
                return
        for event in writer.end():
            yield event
    except Exception as e:  # noqa: BLE001 - after the 200 an error can only be an event
        yield error_event(e, rid)
    yield sse("[DONE]")
