"""Torch's parallel work runs on as few live threads as possible (one OpenMP pool: see docs/performance.md)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.engine import Engine
from app.lifecycle import run_in_short_lived_thread
from tests.support.models import tiny_model


def test_short_lived_thread_returns_the_result_and_is_gone_afterwards() -> None:
    seen: dict[str, threading.Thread] = {}

    def work(x: int) -> int:
        seen["thread"] = threading.current_thread()
        return x * 2

    assert asyncio.run(run_in_short_lived_thread(work, 21)) == 42
    seen["thread"].join(timeout=5)
    assert seen["thread"] is not threading.main_thread()
    assert not seen["thread"].is_alive()


def test_short_lived_thread_raises_the_error_of_the_work() -> None:
    def fail() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        asyncio.run(run_in_short_lived_thread(fail))


def test_engine_allocates_its_sampler_on_its_own_thread(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(tiny_model(), byte_tokenizer, max_batch_size=2, max_seq_len=64)
    assert engine.sampler is None  # nothing allocated by the constructing (event loop) thread
    engine.start()
    try:
        for _ in range(500):
            if engine.sampler is not None:
                break
            threading.Event().wait(0.01)
        assert engine.sampler is not None
        assert engine.sampler.counts.shape == (2, byte_tokenizer.vocab_size)
    finally:
        engine.shutdown()
