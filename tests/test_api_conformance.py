"""OpenAI conformance details found by probing the real server: each test pins one deviation that was fixed.

Tiny random model, in-process app: fast. Expectations come from OpenAI's API reference (and vLLM where
OpenAI says nothing), not from our own output.
"""

from __future__ import annotations

from typing import Any

import pytest

from model.chat import render_chat
from model.tokenizer import ByteTokenizer
from tests.support.api import MAX_SEQ_LEN, MODEL, assert_error, chatml_count, parse_sse, serve_app, settings, still_serves

pytestmark = pytest.mark.anyio

COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hey"}], "max_tokens": 2, "temperature": 0}


# JSON values of the wrong JSON type: OpenAI answers 400 ("'10' is not of type 'integer'"); lax pydantic
# used to coerce them ("10" -> 10, "true" -> True, true -> 1) and serve the request.
WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/completions", {**COMPLETION, "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "stream": "true"}, "stream"),
    ("/v1/completions", {**COMPLETION, "echo": 1}, "echo"),
    ("/v1/completions", {**COMPLETION, "logprobs": True}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "n": "2"}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 1.5}, "n"),
    ("/v1/completions", {**COMPLETION, "seed": "7"}, "seed"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"65": "5"}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": "4"}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "stream": 1}, "stream"),
]


async def test_wrong_json_types_are_400_not_coerced() -> None:
    async with serve_app() as client:
        for path, body, param in WRONG_TYPES:
            error = assert_error(await client.post(path, json=body), 400)
            assert error["param"] is not None and error["param"].startswith(param), (body, error)
        # numbers stay numbers, as in JSON Schema: an int is a float, an integral float (2.0) an integer
        for body in (
            {**COMPLETION, "temperature": 1, "top_p": 1},
            {**COMPLETION, "logit_bias": {"65": -100}},
            {**COMPLETION, "max_tokens": 2.0, "n": 1.0, "seed": 3.0, "logprobs": 1.0},
        ):
            assert (await client.post("/v1/completions", json=body)).status_code == 200, body
        await still_serves(client)


async def test_head_is_answered_on_every_get_route() -> None:
    async with serve_app() as client:
        for path in ("/v1/models", f"/v1/models/{MODEL}", "/metrics", "/health"):
            get, head = await client.get(path), await client.head(path)
            assert head.status_code == get.status_code == 200, path
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
        assert (await client.head("/v1/models/nope")).status_code == 404


CROSS_FIELD: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/completions", {**COMPLETION, "best_of": 3}, "best_of"),
    ("/v1/completions", {**COMPLETION, "suffix": "tail"}, "suffix"),
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {**COMPLETION, "min_tokens": 5}, "min_tokens"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/completions", {**COMPLETION, "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
]


async def test_errors_between_fields_name_the_parameter() -> None:
    async with serve_app() as client:
        for path, body, param in CROSS_FIELD:
            error = assert_error(await client.post(path, json=body), 400)
            assert error["param"] == param, (body, error)
            assert error["message"].count("Invalid request") == 1
        await still_serves(client)


def test_tool_messages_in_llama3_use_the_ipython_header() -> None:
    specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    tokenizer = ByteTokenizer(specials)
    ids = render_chat([{"role": "user", "content": "q"}, {"role": "tool", "content": "42"}], tokenizer, "llama3")
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ids == tokenizer.encode(text, allow_special=True)


async def test_chat_max_tokens_zero_is_400() -> None:
    """OpenAI: "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1" (vLLM agrees)."""
    async with serve_app() as client:
        for field in ("max_tokens", "max_completion_tokens"):
            assert_error(await client.post("/v1/chat/completions", json={**CHAT, field: 0}), 400, param=field)
        # the legacy endpoint keeps max_tokens 0 (echo + logprobs scores a prompt)
        assert (await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 0})).status_code == 200


async def test_chat_context_overflow_counts_the_messages() -> None:
    async with serve_app() as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": MAX_SEQ_LEN})
        error = assert_error(r, 400, code="context_length_exceeded", param="messages")
        prompt = chatml_count("<|im_start|>user\nhey<|im_end|>\n<|im_start|>assistant\n")
        assert f"({prompt} in the messages, {MAX_SEQ_LEN} in the completion)" in error["message"]


async def test_chat_top_logprobs_up_to_20() -> None:
    """OpenAI's range for chat top_logprobs is 0..20 (the legacy endpoint's logprobs stays 0..5)."""
    async with serve_app() as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 20})
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert content and all(len(entry["top_logprobs"]) == 20 for entry in content)
        assert_error(await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 21}), 400)
        assert_error(await client.post("/v1/completions", json={**COMPLETION, "logprobs": 6}), 400, param="logprobs")


async def test_every_chat_chunk_has_the_same_keys() -> None:
    async with serve_app() as client:
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        events, done, _ = parse_sse((await client.post("/v1/chat/completions", json=body)).text)
    assert done and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    assert all(set(e) == set(events[0]) for e in events), [sorted(e) for e in events]


async def test_echo_text_offsets_count_control_token_text() -> None:
    """text[offset[i]:offset[i+1]] is token i, also for control tokens written in a text prompt."""
    body = {**COMPLETION, "prompt": "<|im_start|>hi", "echo": True, "logprobs": 0, "max_tokens": 2, "ignore_eos": True}
    async with serve_app() as client:
        for stream in (False, True):
            r = await client.post("/v1/completions", json={**body, "stream": stream})
            if stream:
                events, _, _ = parse_sse(r.text)
                chunks = [e["choices"][0] for e in events]
                text = "".join(c["text"] for c in chunks)
                tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
                offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
            else:
                choice = r.json()["choices"][0]
                text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
            assert text.startswith("<|im_start|>hi") and tokens[:3] == ["<|im_start|>", "h", "i"]
            assert offsets[:4] == [0, 12, 13, 14], offsets  # generated text starts right after the prompt


async def test_tools_with_tool_choice_none_are_served_and_a_forced_call_without_tools_is_400() -> None:
    """Agent frameworks send their tools on every request; with tool_choice "none" no call may be made."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    async with serve_app() as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": "none"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"].get("tool_calls") is None, r.text
        for choice in ("required", {"type": "function", "function": {"name": "f"}}):
            r = await client.post("/v1/chat/completions", json={**CHAT, "tool_choice": choice})
            assert_error(r, 400, param="tool_choice")


async def test_trailing_slash_is_an_invalid_url_not_a_bodyless_redirect() -> None:
    """OpenAI answers 404 "Invalid URL" in the envelope; a 307 without a body left clients with nothing to show."""
    async with serve_app() as client:
        error = assert_error(await client.post("/v1/completions/", json=COMPLETION), 404, code="unknown_url")
        assert "/v1/completions/" in error["message"]
        assert_error(await client.get("/health/"), 404)


async def test_deeply_nested_json_is_400_not_500() -> None:
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    async with serve_app() as client:
        for body in (b"[" * 100000, deep):
            for path in ("/v1/completions", "/v1/chat/completions"):
                r = await client.post(path, content=body, headers={"content-type": "application/json"})
                assert "nested" in assert_error(r, 400)["message"]
        await still_serves(client)


async def test_more_choices_than_the_queue_holds_is_400_not_a_retryable_503() -> None:
    """A request that can never be admitted must not be a 503: the SDK would retry it in vain."""
    async with serve_app(settings(max_queue=4)) as client:
        r = await client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b", "c"], "n": 2})
        error = assert_error(r, 400, param="n")
        assert "6 completions" in error["message"] and "(4)" in error["message"]
        r = await client.post("/v1/chat/completions", json={**CHAT, "n": 5})
        assert_error(r, 400, param="n")
        assert (await client.post("/v1/completions", json={**COMPLETION, "n": 4})).status_code == 200


async def test_echo_of_token_ids_spells_control_tokens_like_a_text_prompt() -> None:
    """Echoed ids give the text their tokens name: "<|im_start|>hi" for [<|im_start|>, h, i], as for the text prompt."""
    body = {**COMPLETION, "echo": True, "logprobs": 0, "max_tokens": 0}
    async with serve_app() as client:
        from_ids = (await client.post("/v1/completions", json={**body, "prompt": [256, *b"hi"]})).json()["choices"][0]
        from_text = (await client.post("/v1/completions", json={**body, "prompt": "<|im_start|>hi"})).json()["choices"][0]
    assert from_ids["text"] == from_text["text"] == "<|im_start|>hi"
    assert from_ids["logprobs"] == from_text["logprobs"]
    assert from_ids["logprobs"]["text_offset"] == [0, 12, 13]
