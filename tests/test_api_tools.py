"""Tool calling over HTTP on the tiny model: forced calls always parse, streamed calls assemble, bad tools are 400.

The tiny model is random: with tool_choice "required" or a named function the grammar writes the call,
so its arguments follow the schema; with "auto" whatever it writes comes back as content.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
import pytest

from model.checkpoint import LoadedModel
from model.tokenizer import ByteTokenizer
from tests.support.api import CHATML_SPECIALS, MODEL, assert_error, chatml_count, parse_sse, still_serves
from tests.support.api import serve_app as serve_tiny_app
from tests.support.models import tiny_args, tiny_model

pytestmark = pytest.mark.anyio

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
}


CONTEXT = 2048  # a byte tokenizer spends a token per character of the tool list


@asynccontextmanager
async def serve_app() -> AsyncIterator[httpx.AsyncClient]:
    """The tiny model with a context long enough for tool lists."""
    model = tiny_model(max_batch_size=4, max_seq_len=CONTEXT)
    async with serve_tiny_app(loaded=LoadedModel(model, ByteTokenizer(CHATML_SPECIALS), tiny_args(), MODEL, None)) as client:
        yield client


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "?"}], "max_tokens": 200, **fields}


def check_call(call: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    assert call["type"] == "function" and call["id"].startswith("call_")
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert set(arguments) == {"city", "days"} and arguments["city"] in ("Paris", "Oslo") and 1 <= arguments["days"] <= 7
    else:
        assert call["function"]["name"] == "get_time" and arguments["zone"] in ("UTC", "CET")
    return call["function"]["name"], arguments


async def test_required_tool_choice_returns_parseable_calls() -> None:
    async with serve_app() as client:
        body = chat(tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False, n=3, temperature=1.0, seed=5)
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "tool_calls", choice
            message = choice["message"]
            assert message["content"] is None and len(message["tool_calls"]) == 1
            check_call(message["tool_calls"][0])


async def test_a_named_function_is_the_one_called() -> None:
    async with serve_app() as client:
        body = chat(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}})
        r = await client.post("/v1/chat/completions", json=body)
        calls = r.json()["choices"][0]["message"]["tool_calls"]
        assert [check_call(c)[0] for c in calls] == ["get_time"] * len(calls) and calls


async def test_streamed_calls_arrive_as_index_based_deltas() -> None:
    async with serve_app() as client:
        body = chat(tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False, stream=True)
        r = await client.post("/v1/chat/completions", json=body)
        events, done, _ = parse_sse(r.text)
        assert done
        deltas = [e["choices"][0] for e in events if e["choices"]]
        assert deltas[-1]["finish_reason"] == "tool_calls"
        assembled: dict[int, dict[str, Any]] = {}
        for d in deltas:
            assert "content" not in d["delta"] or d["delta"]["content"] == ""
            for part in d["delta"].get("tool_calls", []):
                call = assembled.setdefault(part["index"], {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
                if "id" in part:
                    assert call["id"] is None, "the id comes once, on the call's first delta"
                    call["id"], call["type"] = part["id"], part["type"]
                call["function"]["name"] += part["function"].get("name", "")
                call["function"]["arguments"] += part["function"].get("arguments", "")
        assert sorted(assembled) == list(range(len(assembled))) and assembled
        for call in assembled.values():
            check_call(call)


async def test_a_tool_round_trip_renders_the_call_and_its_result() -> None:
    async with serve_app() as client:
        first = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER], tool_choice="required"))
        message = first.json()["choices"][0]["message"]
        call = message["tool_calls"][0]
        history = [
            {"role": "user", "content": "?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ]
        r = await client.post("/v1/chat/completions", json=chat(messages=history, tools=[WEATHER], max_tokens=5))
        assert r.status_code == 200, r.text
        arguments = json.dumps(json.loads(call["function"]["arguments"]))
        tail = (
            f'<|im_start|>assistant\n<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call><|im_end|>\n'
            "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        )
        without_tools = await client.post("/v1/chat/completions", json=chat(messages=history[:1], max_tokens=5))
        head = without_tools.json()["usage"]["prompt_tokens"] - chatml_count("<|im_start|>assistant\n")
        listed = r.json()["usage"]["prompt_tokens"] - head - chatml_count(tail)
        assert listed > len(json.dumps(WEATHER)), "the tool list is in the prompt"


async def test_tool_choice_none_hides_the_tools_and_auto_returns_content() -> None:
    async with serve_app() as client:
        plain = (await client.post("/v1/chat/completions", json=chat(max_tokens=5))).json()
        hidden = (await client.post("/v1/chat/completions", json=chat(max_tokens=5, tools=[WEATHER], tool_choice="none"))).json()
        assert hidden["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
        auto = (await client.post("/v1/chat/completions", json=chat(max_tokens=5, tools=[WEATHER], temperature=0))).json()
        choice = auto["choices"][0]
        assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
        assert isinstance(choice["message"]["content"], str)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "at least one tool"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "distinct"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "function names"),
        ({"tools": [{"type": "function"}]}, "tools", "function"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools", "function"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
                "tool_choice": "required",
            },
            "tools",
            "nope",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "response_format",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
    ],
)
async def test_bad_tools_are_400_naming_the_field(fields: dict[str, Any], param: str, words: str) -> None:
    async with serve_app() as client:
        r = await client.post("/v1/chat/completions", json=chat(**fields))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"].split(".")[0] == param and words in error["message"], error
        assert_error(r, 400)
        await still_serves(client)


async def test_tool_result_messages_are_rendered_not_rejected() -> None:
    """A history with an assistant tool call (content null) and the tool's answer is a valid OpenAI request."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "function", "name": "f", "content": "7"},  # the deprecated spelling of a tool result
    ]
    async with serve_app() as client:
        r = await client.post("/v1/chat/completions", json=chat(messages=messages, max_tokens=2))
        assert r.status_code == 200, r.text
        prompt = (  # Qwen2.5's template: the call in a <tool_call> block, the results as one user turn
            '<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response>\n<tool_response>\n7\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n"
        )
        assert r.json()["usage"]["prompt_tokens"] == chatml_count(prompt)
        r = await client.post("/v1/chat/completions", json=chat(messages=[{"role": "tool", "content": None}]))
        assert_error(r, 400, param="messages")
