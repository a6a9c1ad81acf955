"""Engine test helpers: a tiny-model engine, deterministic prompts, bounded event loops, output collection."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from app.engine import Engine, GenerationOutput, GenerationRequest, RequestHandle
from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer
from tests.support.models import tiny_model

GREEDY = SamplingParams(temperature=0)


def make_engine(max_batch_size: int = 4, max_seq_len: int = 128, start: bool = True, **kwargs: Any) -> Engine:
    """An engine on the tiny model (seed 0, the reference oracles' weights) and a ByteTokenizer."""
    engine = Engine(
        tiny_model(max_batch_size, max_seq_len), ByteTokenizer(), max_batch_size=max_batch_size, max_seq_len=max_seq_len, **kwargs
    )
    if start:
        engine.start()
    return engine


def prompt(i: int, length: int) -> list[int]:
    """The i-th deterministic byte prompt of `length` tokens."""
    return [(7 * i + 13 * j) % 256 for j in range(length)]


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
