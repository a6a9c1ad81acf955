"""The prefix cache on the wire (issue 13): usage.prompt_tokens_details.cached_tokens, /slots, Prometheus
counters, and the setting that turns it off. (Its exactness is tests/test_prefix_cache.py's.)"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.api import MODEL, parse_sse, serve_app, settings

pytestmark = pytest.mark.anyio

PROMPT = "The same long prompt, sent twice. " * 3


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, **fields}


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_a_repeated_prompt_reports_its_cached_tokens_whole_and_streamed() -> None:
    async with serve_app() as client:
        first = (await client.post("/v1/completions", json=completion())).json()["usage"]
        second = (await client.post("/v1/completions", json=completion())).json()["usage"]
        streamed = await client.post("/v1/completions", json=completion(stream=True, stream_options={"include_usage": True}))
        slots = (await client.get("/slots")).json()
        metrics = (await client.get("/metrics")).text
    n = first["prompt_tokens"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens"] == n and second["prompt_tokens_details"] == {"cached_tokens": n - 1}
    events, done, _ = parse_sse(streamed.text)
    assert done and events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": n - 1}
    assert slots["prefix_cache"]["enabled"] is True and slots["prefix_cache"]["hits"] == 2 * (n - 1)
    assert max(s["cached_tokens"] for s in slots["slots"]) >= n - 1 and all(s["request"] is None for s in slots["slots"])
    assert metric(metrics, "llamaserve_prefix_cache_queries_total") == 3 * n
    assert metric(metrics, "llamaserve_prefix_cache_hits_total") == 2 * (n - 1)


async def test_a_chat_turn_reuses_the_previous_turn() -> None:
    async with serve_app() as client:
        messages = [{"role": "system", "content": "Be brief. " * 4}, {"role": "user", "content": "Hi there"}]
        body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}
        first = (await client.post("/v1/chat/completions", json=body)).json()
        answer = first["choices"][0]["message"]["content"]
        body["messages"] = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "And?"}]
        second = (await client.post("/v1/chat/completions", json=body)).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] - 1 <= cached < second["usage"]["prompt_tokens"]


async def test_the_cache_can_be_turned_off() -> None:
    async with serve_app(settings(prefix_cache=False)) as client:
        await client.post("/v1/completions", json=completion())
        second = (await client.post("/v1/completions", json=completion())).json()["usage"]
        slots = (await client.get("/slots")).json()
    assert second["prompt_tokens_details"] == {"cached_tokens": 0}
    assert slots["prefix_cache"]["enabled"] is False and all(s["cached_tokens"] == 0 for s in slots["slots"])


async def test_slots_are_behind_the_api_key() -> None:
    """/slots names requests in flight: unlike /health and /metrics it needs the key."""
    async with serve_app(settings(api_key="sekret")) as client:
        denied = await client.get("/slots")
        allowed = await client.get("/slots", headers={"Authorization": "Bearer sekret"})
    assert denied.status_code == 401 and denied.json()["error"]["type"]
    assert allowed.status_code == 200 and len(allowed.json()["slots"]) >= 1
