"""Issue 12: no client input gets a 5xx, and every error leaves in the OpenAI envelope.

Two halves. schemathesis fuzzes every operation of the served /openapi.json in-process (ASGI, no
network) against the tiny random-weight model: schema-valid bodies (which must reach the engine and
come back well-formed) and schema-invalid ones (which must be 4xx). Then a hand-made corpus covers what
a schema cannot describe: bytes that are not UTF-8, lone surrogates, numbers past any range, NaN,
nesting past any parser's stack, other media types, bodies that are not objects, duplicate keys.
What tests/test_api_errors.py and tests/test_api_conformance.py already pin is not repeated here.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import jsonschema_rs
import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis import checks
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi

from app.server import create_app
from tests.support.api import MODEL, assert_error, serve_app, settings, still_serves, tiny_loaded

# ---- schemathesis against the served schema ----

# Deterministic, so CI runs the same cases every time (and no .hypothesis database is read or written).
# max-examples bounds the fuzzing phase per operation; the coverage phase (boundary values and one
# mutation per keyword) is deterministic and runs in full. The whole file takes ~30 s on 2 cores.
FUZZ_CONFIG = {"seed": 12, "generation": {"max-examples": 40, "deterministic": True, "database": "none"}}
# At most 4 choices per request (a 400 past that), so n up to 128 costs 4 completions, not 64.
FUZZ_SETTINGS = {"max_choices_per_request": 4}
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def openapi_document() -> dict[str, Any]:
    response = TestClient(create_app(settings())).get("/openapi.json")  # no lifespan: nothing loads
    assert response.status_code == 200
    return response.json()


DOC = openapi_document()
FUZZ_APP = create_app(settings(**FUZZ_SETTINGS), tiny_loaded())
# The served document, run against FUZZ_APP in-process (what schemathesis.openapi.from_asgi does, but
# from_asgi would start the app's lifespan at collection; and pytest 9 breaks the lazy from_fixture).
schema = schemathesis.openapi.from_dict(DOC, config=SchemathesisConfig.from_dict(FUZZ_CONFIG))
schema.app = FUZZ_APP


@pytest.fixture(scope="module")
def fuzz_app_ready() -> Iterator[None]:
    """Start FUZZ_APP's lifespan on schemathesis's event loop (its requests run there) and wait until ready."""
    with asgi.get_client(FUZZ_APP):
        deadline = time.monotonic() + 30
        while FUZZ_APP.state.server.phase != "ready":
            assert time.monotonic() < deadline, f"the app did not get ready: {FUZZ_APP.state.server.phase}"
            time.sleep(0.01)
    try:
        yield
    finally:
        asgi.shutdown_lifespans()  # drains the engine now, not at interpreter exit


@schemathesis.check
def error_envelope(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every 4xx/5xx body is `{"error": {"message", "type", "param", "code"}}`, as the openai SDK reads it."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, f"not the error envelope: {response.text[:300]}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error


def reach_the_engine(case: schemathesis.Case) -> None:
    """Point generated bodies at the served model, and give schema-valid ones what the schema cannot say.

    Without this every generation case is a 404 for an unknown model before the engine sees it. For
    positive cases only: a prompt must not be empty, a role must be a chat role, and only an assistant
    message may have null content (each a 400 that tests/test_api_errors.py already pins).
    """
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    if case.meta is None or case.meta.generation.mode is not schemathesis.GenerationMode.POSITIVE:
        return
    if "prompt" in body:
        prompt = nonempty(body["prompt"])
        body["prompt"] = [nonempty(p) for p in prompt] if isinstance(prompt, list) else prompt
    for message in body.get("messages") or []:
        if message.get("role") not in ROLES:
            message["role"] = "user"
        if message.get("content") is None and message["role"] != "assistant":
            message["content"] = "hi"


def nonempty(prompt: Any) -> Any:
    return "Hi" if prompt == "" else [72] if prompt == [] else prompt


@schema.parametrize()
def test_no_server_error_for_any_generated_request(case: schemathesis.Case, fuzz_app_ready: None) -> None:
    """No 5xx, no hang (a 20 s read timeout fails the case), 4xx for schema-invalid data, errors in the
    envelope, JSON responses as documented. Streams are not checked against the schema: it documents them
    as a string with `x-event-schema`, and schemathesis reads an Open API 3.1 stream schema per event."""
    reach_the_engine(case)
    response = case.call(timeout=20)
    selected = [checks.not_a_server_error, checks.negative_data_rejection, error_envelope]
    if not any(value.startswith("text/event-stream") for value in response.headers.get("content-type", [])):
        selected.append(checks.response_schema_conformance)
    case.validate_response(response, checks=selected)


# ---- the hand-made corpus ----

pytestmark = pytest.mark.anyio

COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
TOKENIZE = {"model": MODEL, "prompt": "Hi"}
DETOKENIZE = {"model": MODEL, "tokens": [72, 105]}
OK_BODIES = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT, "/tokenize": TOKENIZE, "/detokenize": DETOKENIZE}
PATHS = list(OK_BODIES)
JSON = {"content-type": "application/json"}
MAIN_FIELD = {"/v1/completions": "prompt", "/v1/chat/completions": "messages", "/tokenize": "prompt", "/detokenize": "tokens"}
MARK = '"__VALUE__"'


def with_raw(body: dict[str, Any], path: tuple[str, ...], literal: str | bytes) -> bytes:
    """`body` as JSON with the value at `path` (keys, or list indexes as strings) replaced by a raw JSON literal."""
    copy = json.loads(json.dumps(body))
    node = copy
    for key in path[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = path[-1]
    if isinstance(node, list):
        node[int(last)] = "__VALUE__"
    else:
        node[last] = "__VALUE__"
    text = json.dumps(copy).encode()
    assert text.count(MARK.encode()) == 1
    return text.replace(MARK.encode(), literal if isinstance(literal, bytes) else literal.encode())


async def rejected(content: bytes, path: str, status: int = 400, headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with serve_app() as client:
        error = assert_error(await client.post(path, content=content, headers=headers or JSON), status)
        await still_serves(client)
    return error


# Where each endpoint takes text: a value, a list element, an object key (an unknown field is still parsed).
TEXT_SLOTS = [
    ("/v1/completions", ("prompt",)),
    ("/v1/completions", ("stop",)),
    ("/v1/completions", ("model",)),
    ("/v1/chat/completions", ("messages", "0", "content")),
    ("/v1/chat/completions", ("messages", "0", "role")),
    ("/v1/chat/completions", ("user",)),
    ("/tokenize", ("prompt",)),
    ("/detokenize", ("model",)),
]


@pytest.mark.parametrize("path, slot", TEXT_SLOTS)
@pytest.mark.parametrize(
    "raw",
    [
        b'"\xc3\x28"',  # a truncated two-byte sequence
        b'"\xc0\xaf"',  # an overlong "/"
        b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8 (CESU-8)
        b'"ok \xff"',
        b'"\xf4\x90\x80\x80"',  # past U+10FFFF
    ],
    ids=["truncated", "overlong", "cesu8-surrogate", "ff-byte", "past-10ffff"],
)
async def test_invalid_utf8_inside_a_string_is_400(path: str, slot: tuple[str, ...], raw: bytes) -> None:
    body = {**OK_BODIES[path], "stop": "x", "user": "u"} if path.startswith("/v1") else OK_BODIES[path]
    await rejected(with_raw(body, slot, raw), path)


@pytest.mark.parametrize("path, slot", TEXT_SLOTS)
@pytest.mark.parametrize("escape", ['"\\udfff"', '"a\\ud800b"', '"\\ud83d"', '"\\udc00\\ud800"'])
async def test_lone_surrogate_escapes_are_400_wherever_text_goes(path: str, slot: tuple[str, ...], escape: str) -> None:
    body = {**OK_BODIES[path], "stop": "x", "user": "u"} if path.startswith("/v1") else OK_BODIES[path]
    error = await rejected(with_raw(body, slot, escape), path)
    assert "surrogate" in error["message"], error


@pytest.mark.parametrize("path", PATHS)
async def test_a_lone_surrogate_in_a_key_is_400(path: str) -> None:
    """In an unknown field's name (ignored after parsing) and in a logit_bias key."""
    body = json.dumps(OK_BODIES[path])[:-1].encode() + b', "\\ud800": 1}'
    await rejected(body, path)
    if path.startswith("/v1"):
        await rejected(with_raw(OK_BODIES[path], ("logit_bias",), '{"\\udfff": 1}'), path)


async def test_a_valid_surrogate_pair_is_served() -> None:
    """The positive control: an escaped astral character (U+1F600) is text like any other."""
    async with serve_app() as client:
        content = with_raw(TOKENIZE, ("prompt",), '"\\ud83d\\ude00"')
        r = await client.post("/tokenize", content=content, headers=JSON)
        assert r.status_code == 200 and r.json()["tokens"] == list("😀".encode()), r.text


# Every numeric field by endpoint, as a key path (the engine never sees one of these values).
NUMBER_SLOTS = [
    ("/v1/completions", ("top_k",)),
    ("/v1/completions", ("min_tokens",)),
    ("/v1/completions", ("logprobs",)),
    ("/v1/completions", ("best_of",)),
    ("/v1/completions", ("temperature",)),
    ("/v1/completions", ("top_p",)),
    ("/v1/completions", ("presence_penalty",)),
    ("/v1/completions", ("min_p",)),
    ("/v1/completions", ("repetition_penalty",)),
    ("/v1/completions", ("prompt", "0")),
    ("/v1/completions", ("stop_token_ids", "0")),
    ("/v1/completions", ("logit_bias", "65")),
    ("/v1/chat/completions", ("max_tokens",)),
    ("/v1/chat/completions", ("max_completion_tokens",)),
    ("/v1/chat/completions", ("top_logprobs",)),
    ("/v1/chat/completions", ("n",)),
    ("/v1/chat/completions", ("frequency_penalty",)),
    ("/detokenize", ("tokens", "1")),
]
NUMBER_BODIES = {
    "/v1/completions": {**COMPLETION, "prompt": [72, 105], "stop_token_ids": [1], "logit_bias": {"65": 1}},
    "/v1/chat/completions": {**CHAT, "logprobs": True},
    "/detokenize": DETOKENIZE,
}


HUGE_NUMBERS = {
    "int-5000-digits": "9" * 5000,
    "negative-int-5000-digits": "-" + "9" * 5000,
    "float-4300-digits": "1" * 4300 + ".5",
    "1e400": "1e400",
    "-1e400": "-1e400",
    "1e309": "1e309",
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
}


@pytest.mark.parametrize("path, slot", NUMBER_SLOTS)
@pytest.mark.parametrize("literal", list(HUGE_NUMBERS.values()), ids=list(HUGE_NUMBERS))
async def test_numbers_past_any_range_and_non_finite_literals_are_400(path: str, slot: tuple[str, ...], literal: str) -> None:
    error = await rejected(with_raw(NUMBER_BODIES[path], slot, literal), path)
    assert len(error["message"]) < 1000, "the error quotes a bounded excerpt"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("opening, closing", [("[", "]"), ('{"a":', "}")], ids=["arrays", "objects"])
async def test_10000_levels_of_nesting_are_400_everywhere(path: str, opening: str, closing: str) -> None:
    """At the top and inside a field every endpoint reads (conformance pins 50000 levels of arrays in two)."""
    deep = opening * 10000 + "1" + closing * 10000
    field = MAIN_FIELD[path]
    for content in (deep.encode(), with_raw(OK_BODIES[path], (field,), deep), with_raw(OK_BODIES[path], ("extra",), deep)):
        error = await rejected(content, path)
        assert "nested" in error["message"], error


@pytest.mark.parametrize("key", ["1e3", "", "1.0", "0b1", "\u0661", "\uff15", "5\n", "\x00"])
async def test_more_logit_bias_keys_that_are_not_token_ids_are_400(key: str) -> None:
    """Besides the keys test_api_errors pins: exponents, fractions, fullwidth and Arabic-Indic digits, controls."""
    for path in ("/v1/completions", "/v1/chat/completions"):
        error = await rejected(json.dumps({**OK_BODIES[path], "logit_bias": {key: 1}}).encode(), path)
        assert error["param"] == "logit_bias", error


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "content_type",
    ["application/x-json", "text/json", "*/*", "application/*", "application/json-seq", "application/xml", ";", "\u00ff"],
)
async def test_other_media_types_are_415_before_the_body_is_read(path: str, content_type: str) -> None:
    """Even with a JSON body (test_api_errors pins text/plain, forms, multipart)."""
    headers = [(b"content-type", content_type.encode("latin-1"))]
    async with serve_app() as client:
        r = await client.post(path, content=json.dumps(OK_BODIES[path]).encode(), headers=headers)
        assert assert_error(r, 415)["code"] == "unsupported_media_type"
        r = await client.post(path, content=b"", headers=headers)
        assert_error(r, 415)


NOT_ONE_OBJECT = {
    "empty": b"",
    "blank": b"   ",
    "string": b'"a string"',
    "null": b"null",
    "true": b"true",
    "number": b"1",
    "empty-array": b"[]",
    "array-of-object": b"[{}]",
    "empty-object": b"{}",
    "bom": b"\xef\xbb\xbf{}",
    "two-objects": b"{} {}",
    "trailing-comma": b"{},",
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("content", list(NOT_ONE_OBJECT.values()), ids=list(NOT_ONE_OBJECT))
async def test_bodies_that_are_not_one_json_object_are_400(path: str, content: bytes) -> None:
    for headers in (JSON, {}):  # also without a Content-Type (taken as JSON)
        async with serve_app() as client:
            assert_error(await client.post(path, content=content, headers=headers), 400)
    array = json.dumps([OK_BODIES[path]]).encode()  # a valid request, wrapped in an array
    await rejected(array, path)


@pytest.mark.parametrize("path", PATHS)
async def test_duplicate_keys_take_the_last_value_without_a_5xx(path: str) -> None:
    """As Python's json, JSON.parse and vLLM do: the last occurrence wins; a bad one before it is never read."""
    field = MAIN_FIELD[path]
    good = json.dumps(OK_BODIES[path][field])
    body = json.dumps(OK_BODIES[path])[:-1]
    async with serve_app() as client:
        r = await client.post(path, content=f'{body}, "{field}": {good}, "{field}": 5}}'.encode(), headers=JSON)
        assert_error(r, 400, param=field)
        r = await client.post(path, content=f'{body[:1]}"{field}": 5, {body[1:]}}}'.encode(), headers=JSON)
        assert r.status_code == 200, r.text
        r = await client.post(path, content=f'{body}, "model": "{MODEL}", "model": "nope"}}'.encode(), headers=JSON)
        assert_error(r, 404, param="model")


SCHEMA_NAMES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}
SCHEMA_NAMES |= {"/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
FIELDS = [(path, field) for path, name in SCHEMA_NAMES.items() for field in DOC["components"]["schemas"][name]["properties"]]
# One JSON value of each kind; a value the field's schema admits is skipped (and `[{}]`, `{"a": 1}` are
# admitted by tools / tool_choice / content, which take any JSON).
WRONG_VALUES: list[Any] = ["text", "", 1.5, 7, -7, True, False, [], ["text"], [1.5], [[]], [{}], {}, {"a": 1}]


def validator_for(path: str) -> Any:
    """A JSON Schema validator for `path`'s request body, as the served document declares it."""
    root = {"$ref": f"#/components/schemas/{SCHEMA_NAMES[path]}", "components": DOC["components"]}
    return jsonschema_rs.validator_for(root)


@pytest.mark.parametrize("path, field", FIELDS)
async def test_a_wrong_type_for_any_field_is_400_naming_it(path: str, field: str) -> None:
    """Every field of every request body against values its served schema refuses (conformance pins a
    few coercions; this is all of them). The schema and the server must agree: refused means 400."""
    validator = validator_for(path)
    async with serve_app() as client:
        for value in WRONG_VALUES:
            body = {**OK_BODIES[path], field: value}
            if validator.is_valid(body):
                continue
            error = assert_error(await client.post(path, json=body), 400)
            assert error["param"] is not None and error["param"].split(".")[0] == field, (body, error)
        await still_serves(client)


@pytest.mark.parametrize("path, field", FIELDS)
async def test_null_for_any_field_is_400_naming_it_where_the_schema_refuses_null_else_served(path: str, field: str) -> None:
    body = {**OK_BODIES[path], field: None}
    async with serve_app() as client:
        r = await client.post(path, json=body)
        if validator_for(path).is_valid(body):
            assert r.status_code == 200, (field, r.text)
        else:
            assert_error(r, 400, param=field)


async def test_every_field_null_at_once_is_400() -> None:
    for path in PATHS:
        properties = DOC["components"]["schemas"][SCHEMA_NAMES[path]]["properties"]
        await rejected(json.dumps(dict.fromkeys(properties)).encode(), path)


@pytest.mark.parametrize("path", PATHS)
async def test_too_large_is_413_on_every_endpoint_and_a_malformed_length_is_400(path: str) -> None:
    """test_api_errors pins 413 for completions. A Content-Length that h11 would refuse ("²", 5000 digits)
    can still reach the app from another ASGI server: it answered 500 (str.isdigit, int's digit limit)."""
    async with serve_app(settings(max_body_bytes=2048)) as client:
        big = {**OK_BODIES[path], "user": "x" * 5000}
        assert_error(await client.post(path, json=big), 413)
        lengths = [(b"9" * 5000, 413), (b"9" * 25, 413), ("²".encode("latin-1"), 400), ("٣".encode(), 400)]
        for length, status in lengths + [(b"-1", 400), (b"1e3", 400), (b" ", 400), (b"0x10", 400)]:
            headers = [(b"content-type", b"application/json"), (b"content-length", length)]
            r = await client.post(path, content=json.dumps(OK_BODIES[path]).encode(), headers=headers)
            assert_error(r, status)
        await still_serves(client)
