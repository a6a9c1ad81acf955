"""A fake OpenAI-style SSE completions server whose timings and failures are known in advance (for the bench tools)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

FIRST_TOKEN_DELAY = 0.05
TOKEN_GAP = 0.01


class FakeServer:
    """Streams `max_tokens` one-token chunks (3 without min_tokens, like an early EOS), after a fixed
    delay; every `fail_every`-th request gets a 503, and `break_stream` sends an error event mid-stream."""

    def __init__(
        self,
        *,
        fail_every: int = 0,
        send_usage: bool = True,
        break_stream: bool = False,
        cut_at: int = 0,
        first_token_delay: float = FIRST_TOKEN_DELAY,
        token_gap: float = TOKEN_GAP,
    ) -> None:
        self.fail_every, self.send_usage, self.break_stream = fail_every, send_usage, break_stream
        self.first_token_delay, self.token_gap = first_token_delay, token_gap
        self.cut_at = cut_at  # end the response after this many chunks, without [DONE]
        self.bodies: list[dict[str, Any]] = []
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
            ]
        )

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(self, request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.fail_every and len(self.bodies) % self.fail_every == 0:
            return JSONResponse({"error": {"message": "busy", "type": "server_error"}}, status_code=503)
        n = body["max_tokens"] if body.get("min_tokens") == body["max_tokens"] else min(3, body["max_tokens"])
        include_usage = self.send_usage and body.get("stream_options", {}).get("include_usage")
        return StreamingResponse(self.events(n, include_usage), media_type="text/event-stream")

    async def events(self, n: int, include_usage: bool):  # type: ignore[no-untyped-def]
        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        await asyncio.sleep(self.first_token_delay)
        yield ": keepalive\n\n"
        for i in range(n):
            if i:
                await asyncio.sleep(self.token_gap)
            if self.break_stream and i == 2:
                yield event({"error": {"message": "engine died", "type": "server_error"}})
                yield "data: [DONE]\n\n"
                return
            if self.cut_at and i == self.cut_at:
                return
            finish = ("length" if n > 3 else "stop") if i == n - 1 else None
            yield event(
                {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": " w", "finish_reason": finish}]}
            )
        if include_usage:
            yield event({"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n}})
        yield "data: [DONE]\n\n"
