"""POST /v1/completions on a tiny random model: response shape, every request field, streaming wire format."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.support.api import IM_END, MODEL, parse_sse, serve_app, settings, tiny_loaded, token_id
from tests.support.reference import reference_greedy_logprobs, reference_prompt_logprobs

pytestmark = pytest.mark.anyio


def completion(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    body.update(fields)
    return body


def choice_ids(choice: dict[str, Any]) -> list[int]:
    return [token_id(t, tiny_loaded().tokenizer) for t in choice["logprobs"]["tokens"]]  # type: ignore[arg-type]


async def test_response_shape_and_greedy_matches_reference() -> None:
    async with serve_app() as client:
        r = await client.post("/v1/completions", json=completion(logprobs=0, ignore_eos=True))
    assert r.status_code == 200
    body = r.json()
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    expected_ids, expected_lps = reference_greedy_logprobs(list(b"Hello"), 8)
    assert choice_ids(choice) == expected_ids
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected_lps, abs=1e-3)
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 8,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_n_and_prompt_list_index_is_prompt_times_n_plus_i() -> None:
    prompts = ["Hi", "The cat"]
    async with serve_app() as client:
        r = await client.post(
            "/v1/completions",
            json=completion(prompt=prompts, n=2, echo=True, max_tokens=3, ignore_eos=True, temperature=1.0, seed=1),
        )
    body = r.json()
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    for c in body["choices"]:
        assert c["text"].startswith(prompts[c["index"] // 2])
    # prompt tokens count once per prompt, completion tokens over all choices
    assert body["usage"] == {
        "prompt_tokens": 2 + 7,
        "completion_tokens": 4 * 3,
        "total_tokens": 21,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_token_id_prompts_and_list_of_token_lists() -> None:
    async with serve_app() as client:
        single = (await client.post("/v1/completions", json=completion(prompt=list(b"Hello")))).json()
        text = (await client.post("/v1/completions", json=completion(prompt="Hello"))).json()
        multi = (await client.post("/v1/completions", json=completion(prompt=[list(b"Hello"), list(b"ab")], echo=True))).json()
    assert single["choices"][0]["text"] == text["choices"][0]["text"]
    assert [c["text"][:5] for c in multi["choices"]] == ["Hello", "ab" + multi["choices"][1]["text"][2:5]]
    assert multi["usage"]["prompt_tokens"] == 7


async def test_echo_with_prompt_logprobs_and_max_tokens_zero() -> None:
    async with serve_app() as client:
        r = await client.post("/v1/completions", json=completion(prompt="Hello", echo=True, logprobs=2, max_tokens=0))
    body = r.json()
    [choice] = body["choices"]
    assert choice["text"] == "Hello" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == list("Hello")
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(reference_prompt_logprobs(list(b"Hello")), abs=1e-3)
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 0,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_echo_logprobs_then_generation_offsets_continue() -> None:
    async with serve_app() as client:
        body = (
            await client.post("/v1/completions", json=completion(echo=True, logprobs=1, max_tokens=4, ignore_eos=True))
        ).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 5 + 4
    assert lp["text_offset"][:6] == [0, 1, 2, 3, 4, 5]  # generation starts right after the echoed prompt
    assert all(a <= b for a, b in zip(lp["text_offset"], lp["text_offset"][1:]))


async def test_logprobs_shape_top_includes_chosen_token() -> None:
    async with serve_app() as client:
        body = (
            await client.post("/v1/completions", json=completion(logprobs=3, temperature=1.0, seed=3, ignore_eos=True))
        ).json()
    lp = body["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 8
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert math.isfinite(logprob) and logprob <= 0
        assert 3 <= len(top) <= 4 and top[token] == pytest.approx(logprob)


async def test_stop_string_is_excluded_and_finishes_with_stop() -> None:
    async with serve_app() as client:
        free = (await client.post("/v1/completions", json=completion(max_tokens=16, ignore_eos=True))).json()["choices"][0][
            "text"
        ]
        stop = next(ch for ch in free[2:] if ch.isascii() and ch.isalnum())
        stopped = (
            await client.post("/v1/completions", json=completion(max_tokens=16, ignore_eos=True, stop=[stop, "zzzz"]))
        ).json()
    assert stopped["choices"][0]["text"] == free[: free.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


async def test_stop_token_ids_eos_ignore_eos_and_min_tokens() -> None:
    async with serve_app() as client:
        free = (await client.post("/v1/completions", json=completion(logprobs=0, ignore_eos=True))).json()["choices"][0]
        ids = choice_ids(free)
        third = ids[2]
        r = (await client.post("/v1/completions", json=completion(stop_token_ids=[third], ignore_eos=True))).json()
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == ids.index(third) + 1  # the stop token counts, is not rendered
        eos = {str(IM_END): 100}
        r = (await client.post("/v1/completions", json=completion(logit_bias=eos))).json()
        assert r["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
        r = (await client.post("/v1/completions", json=completion(logit_bias=eos, ignore_eos=True, max_tokens=4))).json()
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 4
        r = (await client.post("/v1/completions", json=completion(logit_bias=eos, min_tokens=3))).json()
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 4


async def test_logit_bias_forces_a_token() -> None:
    async with serve_app() as client:
        body = (
            await client.post("/v1/completions", json=completion(temperature=1.0, logit_bias={str(ord("A")): 100}, max_tokens=6))
        ).json()
    assert body["choices"][0]["text"] == "AAAAAA"


async def test_seed_reproducible_and_sampling_extras_accepted() -> None:
    fields = dict(
        temperature=1.0,
        top_p=0.9,
        top_k=50,
        min_p=0.01,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
        user="u1",
        best_of=2,
        n=2,
        max_tokens=12,
        ignore_eos=True,
    )
    async with serve_app() as client:
        a = (await client.post("/v1/completions", json=completion(seed=7, **fields))).json()
        b = (await client.post("/v1/completions", json=completion(seed=7, **fields))).json()
        c = (await client.post("/v1/completions", json=completion(seed=8, **fields))).json()
    texts = lambda r: [ch["text"] for ch in r["choices"]]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert texts(a)[0] != texts(a)[1]  # the n choices of one seed differ


async def test_defaults_max_tokens_16_and_null_fields() -> None:
    body = {
        "model": MODEL,
        "prompt": "Hi",
        "ignore_eos": True,
        "temperature": None,
        "top_p": None,
        "n": None,
        "stop": None,
        "logprobs": None,
        "max_tokens": None,
        "logit_bias": None,
        "seed": None,
    }
    async with serve_app() as client:
        r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16


async def test_streaming_wire_format_matches_non_streaming() -> None:
    request = completion(
        prompt=["Hi", "The cat"], n=2, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True, logprobs=1, echo=True
    )
    async with serve_app() as client:
        whole = (await client.post("/v1/completions", json=request)).json()
        r = await client.post("/v1/completions", json={**request, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    events, done, _ = parse_sse(r.text)
    assert done and events
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    offsets: dict[int, list[int]] = {}
    finished: dict[int, int] = {}
    for e in events:
        assert e["object"] == "text_completion" and "usage" not in e
        [c] = e["choices"]
        assert c["index"] not in finished, "no chunk after a choice's finish_reason"
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        tokens.setdefault(c["index"], []).extend(c["logprobs"]["tokens"])
        offsets.setdefault(c["index"], []).extend(c["logprobs"]["text_offset"])
        if c["finish_reason"] is not None:
            finished[c["index"]] = 1
    assert sorted(finished) == [0, 1, 2, 3]
    for c in whole["choices"]:
        assert c["text"].startswith(["Hi", "The cat"][c["index"] // 2])
        assert texts[c["index"]] == c["text"]
        assert tokens[c["index"]] == c["logprobs"]["tokens"]
        assert offsets[c["index"]] == c["logprobs"]["text_offset"]


async def test_streaming_usage_chunk_and_echo() -> None:
    request = completion(
        prompt="Hello", echo=True, max_tokens=5, ignore_eos=True, stream=True, stream_options={"include_usage": True}
    )
    async with serve_app() as client:
        r = await client.post("/v1/completions", json=request)
    events, done, _ = parse_sse(r.text)
    assert done
    *chunks, last = events
    assert all("usage" in e and e["usage"] is None for e in chunks)
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 5,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert chunks[0]["choices"][0]["text"].startswith("Hello")
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_streaming_keepalive_while_waiting_for_a_slot() -> None:
    cfg = settings(keepalive_s=0.01)
    loaded = tiny_loaded(max_batch_size=1)
    slow_forward = loaded.model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        import time

        time.sleep(0.01)
        return slow_forward(*args, **kwargs)

    loaded.model.forward = forward  # type: ignore[method-assign]
    async with serve_app(cfg, loaded) as client:
        import asyncio

        busy = asyncio.ensure_future(client.post("/v1/completions", json=completion(max_tokens=20, ignore_eos=True)))
        await asyncio.sleep(0.05)
        r = await client.post("/v1/completions", json=completion(max_tokens=2, ignore_eos=True, stream=True))
        await busy
    events, done, keepalives = parse_sse(r.text)
    assert done and keepalives >= 1
    assert events[-1]["choices"][0]["finish_reason"] == "length"
