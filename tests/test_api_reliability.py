"""Reliability regressions (issue 12): drain-cut streams say so, big prompts do not stall the event
loop, one request cannot take every slot or the whole queue, the queue cannot be configured away."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import Settings
from tests.support.api import OK, assert_error, parse_sse, serve_app, settings, slowed, tiny_loaded


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_stream_cut_by_the_drain_ends_with_a_server_draining_error_not_length(path: str) -> None:
    loaded = slowed(tiny_loaded(), 0.01)
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 100, "ignore_eos": True, "stream": True}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    async with serve_app(settings(drain_timeout=0.1), loaded) as client:
        state = client.app.state.server  # type: ignore[attr-defined]
        running = asyncio.ensure_future(client.post(path, json=body))
        while state.engine.stats().running == 0:
            await asyncio.sleep(0.005)
        await state.drain()
        response = await running
    events, done, _ = parse_sse(response.text)
    assert done and response.status_code == 200
    assert events[-1]["error"]["code"] == "server_draining"
    reasons = [c["finish_reason"] for e in events[:-1] for c in e.get("choices", [])]
    assert reasons and set(reasons) == {None}, "a cut stream must not look like max_tokens"


@pytest.mark.anyio
async def test_health_answers_while_a_big_prompt_is_being_tokenized() -> None:
    loaded = tiny_loaded()
    encode = loaded.tokenizer.encode
    inside, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow_encode(*args: Any, **kwargs: Any) -> list[int]:
        if args and args[0] == "BIG":
            inside.set()
            release.wait(3)  # on the event loop, nothing else runs until this returns
            finished.set()
        return encode(*args, **kwargs)

    loaded.tokenizer.encode = slow_encode  # type: ignore[method-assign]
    async with serve_app(loaded=loaded) as client:
        for path, body in (("/tokenize", {"prompt": "BIG"}), ("/v1/completions", {**OK, "prompt": "BIG"})):
            inside.clear()
            release.clear()
            finished.clear()
            pending = asyncio.ensure_future(client.post(path, json=body))
            while not inside.is_set():
                await asyncio.sleep(0.005)
            health = await asyncio.wait_for(client.get("/health"), 5)  # on the event loop this would wait for encode
            assert health.status_code == 200 and not finished.is_set(), "health waited for the tokenizer"
            release.set()
            assert (await pending).status_code == 200


@pytest.mark.anyio
async def test_one_request_may_ask_for_at_most_max_choices_per_request() -> None:
    async with serve_app(settings(max_choices_per_request=4)) as client:
        assert (await client.post("/v1/completions", json={**OK, "n": 4})).status_code == 200
        assert_error(await client.post("/v1/completions", json={**OK, "n": 5}), 400, param="n")
        assert_error(await client.post("/v1/completions", json={**OK, "prompt": ["a", "b", "c"], "n": 2}), 400, param="n")
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "n": 5}
        assert_error(await client.post("/v1/chat/completions", json=chat), 400, param="n")


@pytest.mark.anyio
async def test_a_small_request_is_not_starved_by_a_request_with_many_choices() -> None:
    """2 slots, a request with 12 long choices, then a 1-token request: the small one gets the next free
    slot instead of waiting for all 12."""
    loaded = slowed(tiny_loaded(max_batch_size=2), 0.005)
    async with serve_app(settings(), loaded) as client:
        state = client.app.state.server  # type: ignore[attr-defined]
        big = asyncio.ensure_future(
            client.post("/v1/completions", json={**OK, "n": 12, "max_tokens": 20, "ignore_eos": True, "temperature": 1.0})
        )
        while state.engine.stats().running < 2:
            await asyncio.sleep(0.005)
        small = await client.post("/v1/completions", json={**OK, "max_tokens": 1})
        assert small.status_code == 200
        finished = state.engine.stats().generated_tokens_total
        assert not big.done() and finished < 12 * 20 // 2, "the small request waited for most of the big one"
        assert (await big).status_code == 200


def test_max_queue_must_admit_something() -> None:
    with pytest.raises(ValidationError):
        Settings(max_queue=0)
    assert Settings(max_queue=1).max_queue == 1
