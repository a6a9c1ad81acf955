"""Structured outputs over HTTP: response_format and vLLM's guided_* / structured_outputs on the tiny model.

The tiny model is random, so whatever it writes comes from the grammar: these tests check that the
grammar holds (parseable, schema-valid, one of the choices), how it meets max_tokens, n, seeds,
logprobs and streaming, and that every bad constraint is a 400 naming its field.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from tests.support.api import MODEL, assert_error, parse_sse, serve_app, still_serves

pytestmark = pytest.mark.anyio

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "mood": {"enum": ["calm", "busy"]},
    },
    "required": ["ok", "n", "mood"],
    "additionalProperties": False,
}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Describe yourself."}], "max_tokens": 60, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "JSON:", "max_tokens": 60, **fields}


def json_schema_format(schema: dict[str, Any] = SCHEMA) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "status", "schema": schema, "strict": True}}


def assert_valid(text: str) -> dict[str, Any]:
    value = json.loads(text)
    assert set(value) == {"ok", "n", "mood"}, value
    assert isinstance(value["ok"], bool) and isinstance(value["n"], int) and 0 <= value["n"] <= 99
    assert value["mood"] in ("calm", "busy")
    return value


async def test_chat_json_schema_gives_a_valid_object_for_every_choice() -> None:
    async with serve_app() as client:
        body = chat(response_format=json_schema_format(), n=3, temperature=1.0, seed=7)
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "stop"
            assert_valid(choice["message"]["content"])
        again = await client.post("/v1/chat/completions", json=body)
        assert [c["message"] for c in again.json()["choices"]] == [c["message"] for c in r.json()["choices"]], "seeded"


async def test_streamed_json_schema_assembles_to_a_valid_object() -> None:
    async with serve_app() as client:
        r = await client.post("/v1/chat/completions", json=chat(response_format=json_schema_format(), stream=True))
        events, done, _ = parse_sse(r.text)
        assert done
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert_valid(text)
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"


async def test_json_object_mode_parses_on_both_endpoints() -> None:
    async with serve_app() as client:
        for path, body in (
            ("/v1/chat/completions", chat(response_format={"type": "json_object"}, max_tokens=80)),
            ("/v1/completions", completion(response_format={"type": "json_object"}, max_tokens=80)),
        ):
            r = await client.post(path, json={**body, "n": 2, "temperature": 0.7, "seed": 1})
            assert r.status_code == 200, r.text
            for choice in r.json()["choices"]:
                text = choice["message"]["content"] if "message" in choice else choice["text"]
                if choice["finish_reason"] == "stop":
                    assert isinstance(json.loads(text), dict)
                else:  # cut by max_tokens: a prefix of an object
                    assert choice["finish_reason"] == "length" and text.startswith("{")


async def test_a_json_cut_by_max_tokens_is_finish_reason_length() -> None:
    async with serve_app() as client:
        r = await client.post("/v1/chat/completions", json=chat(response_format=json_schema_format(), max_tokens=4))
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        content = choice["message"]["content"]
        assert content.startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(content)
        assert r.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        ({"guided_choice": ["positive", "negative", "neutral"]}, lambda t: t in ("positive", "negative", "neutral")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"guided_regex": r"[A-Z][a-z]{2,5} [0-9]{3}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{3}", t)),
        ({"structured_outputs": {"regex": r"(red|green)-[0-9]"}}, lambda t: re.fullmatch(r"(red|green)-[0-9]", t)),
        ({"guided_grammar": 'root ::= "(" [a-c]{1,3} ")"'}, lambda t: re.fullmatch(r"\([a-c]{1,3}\)", t)),
        ({"guided_grammar": 'start: "<" NAME ">"\nNAME: /[xyz]{2}/'}, lambda t: re.fullmatch(r"<[xyz]{2}>", t)),
        ({"guided_json": SCHEMA}, lambda t: assert_valid(t)),
        ({"guided_json": json.dumps(SCHEMA)}, lambda t: assert_valid(t)),
        ({"structured_outputs": {"json": SCHEMA}}, lambda t: assert_valid(t)),
    ],
)
async def test_vllm_guided_fields_on_completions(fields: dict[str, Any], check: Any) -> None:
    async with serve_app() as client:
        r = await client.post("/v1/completions", json=completion(**fields, n=2, temperature=1.0, seed=3))
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "stop", choice
            assert check(choice["text"]), choice["text"]


async def test_logprobs_and_the_prefix_cache_work_under_a_grammar() -> None:
    async with serve_app() as client:
        body = chat(response_format=json_schema_format(), logprobs=True, top_logprobs=2, temperature=0)
        first = (await client.post("/v1/chat/completions", json=body)).json()
        second = (await client.post("/v1/chat/completions", json=body)).json()
        assert first["choices"][0]["message"] == second["choices"][0]["message"]
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        content = first["choices"][0]["logprobs"]["content"]
        assert "".join(t["token"] for t in content) == first["choices"][0]["message"]["content"]
        assert all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 for t in content)


async def test_unconstrained_requests_beside_a_constrained_one_are_unchanged() -> None:
    async with serve_app() as client:
        plain = chat(temperature=0, max_tokens=20)
        alone = (await client.post("/v1/chat/completions", json=plain)).json()
        both = await asyncio.gather(
            client.post("/v1/chat/completions", json=plain),
            client.post("/v1/chat/completions", json=chat(response_format=json_schema_format())),
        )
        assert both[0].json()["choices"][0]["message"] == alone["choices"][0]["message"]
        assert_valid(both[1].json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize(
    ("path", "fields", "param", "words"),
    [
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "schema",
        ),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ("/v1/chat/completions", {"response_format": json_schema_format({"type": "nope"})}, "response_format", "nope"),
        ("/v1/chat/completions", {"response_format": json_schema_format({"type": "object", "if": {}})}, "response_format", "if"),
        ("/v1/completions", {"guided_regex": "[a-"}, "guided_regex", "regex"),
        ("/v1/completions", {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ("/v1/completions", {"guided_choice": []}, "guided_choice", "non-empty"),
        ("/v1/completions", {"guided_grammar": "start: missing"}, "guided_grammar", "missing"),
        ("/v1/completions", {"structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs", "structural_tag"),
        ("/v1/completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one way only"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "one way only",
        ),
    ],
)
async def test_bad_constraints_are_400_naming_the_field(path: str, fields: dict[str, Any], param: str, words: str) -> None:
    async with serve_app() as client:
        body = chat(**fields) if path.endswith("chat/completions") else completion(**fields)
        error = assert_error(await client.post(path, json={**body, "stream": True}), 400, param=param)
        assert words in error["message"], error
        await still_serves(client)
