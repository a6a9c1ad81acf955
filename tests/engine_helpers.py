"""Helpers shared by the engine test modules: bounded event loops and output collection."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from app.engine import Engine, GenerationOutput, GenerationRequest, RequestHandle


def run(coro: Awaitable[Any], timeout: float = 60.0) -> Any:
    """asyncio.run with a deadline, so a hung engine fails the test instead of hanging it."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def collect(handle: RequestHandle) -> list[GenerationOutput]:
    return [out async for out in handle]


async def generate(engine: Engine, request: GenerationRequest) -> list[GenerationOutput]:
    return await collect(engine.submit(request))


def ids_of(outputs: list[GenerationOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def text_of(outputs: list[GenerationOutput]) -> str:
    return "".join(out.text for out in outputs)
