"""The real server process (`python -m app`, default SmolLM2 model) driven by the official openai SDK.

One process for the module, started with an API key, small batch and context; killed at the end.
Expected answers come from docs/default-model.md (checked against transformers and llama.cpp). The
server runs float32 (`--quantization none`): exact-token goldens hold there on every CPU, while the
int4 default flips the near-tied first token of the France answer on some (tests/test_fidelity.py
checks int4 by distribution instead).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support import REPO
from tests.support.api import free_port, wait_healthy
from tests.support.oracle import GOLDEN_PROMPT

API_KEY = "sk-llamaserve-test"
MODEL = "SmolLM2-135M-Instruct"
_PROCESSES: dict[str, subprocess.Popen[str]] = {}  # base url -> server process


@pytest.fixture(scope="module")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMASERVE_THREADS": os.environ.get("LLAMASERVE_TEST_THREADS", "2")}
    command = [
        sys.executable,
        "-m",
        "app",
        "--model",
        str(smollm2_path),
        "--port",
        str(port),
        "--max-batch-size",
        "4",
        "--max-seq-len",
        "512",
        "--quantization",
        "none",
        "--api-key",
        API_KEY,
        "--log-level",
        "warning",
        "--no-compile",  # the API is under test; the compiled default server is tests/test_soak.py's (saves a cold compile)
        "--drain-timeout",
        "10",  # the SIGTERM test's 30-token stream must finish inside it on a slow, busy CPU
    ]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    _PROCESSES[url] = proc
    try:
        wait_healthy(url, proc, log, timeout=120)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_lists_the_default_model(client: openai.OpenAI) -> None:
    [model] = client.models.list().data
    assert model.id == MODEL
    assert model.model_extra and model.model_extra["max_model_len"] == 512
    assert model.model_extra["quantization"] == "none" and model.model_extra["batch_invariant"] is True  # the default mode


def test_completion_greedy_matches_reference_answer(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=GOLDEN_PROMPT, max_tokens=20, temperature=0)
    assert r.choices[0].text == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"  # <|im_end|> ends the turn
    assert r.usage is not None and r.usage.prompt_tokens == len(GOLDEN_PROMPT) and r.usage.completion_tokens == 8


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24


def test_chat_answers_paris_and_streams(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    answer = r.choices[0].message.content or ""
    assert "Paris" in answer and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_unicode_streams_without_replacement_characters(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Repeat exactly: café, naïve, 東京, 🙂🎉"}]
    kwargs = dict(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content or ""
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)]
    assert "".join(pieces) == whole
    assert not any("\ufffd" in p for p in pieces)
    assert any(ord(ch) > 127 for ch in whole)


def test_n_and_list_prompts(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], n=2, max_tokens=5, temperature=0.8, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage is not None and r.usage.completion_tokens <= 4 * 5


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 3
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.top_logprobs is not None and all(2 <= len(top) <= 3 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(t.top_logprobs) == 2 for t in content)


def test_errors_are_sdk_exceptions(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError) as overflow:
        client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)
    assert overflow.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    stranger = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices


def test_stream_disconnect_frees_the_slot(client: openai.OpenAI, server: str) -> None:
    stream = client.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 5
    while "llamaserve_requests_running 0.0" not in httpx.get(f"{server}/metrics").text:
        assert time.monotonic() < deadline, "slot not freed after the client went away"
        time.sleep(0.05)


PLAIN = r"^[A-Za-z .,'-]*$"  # no JSON escapes: an escape such as \u00e9 spends ~3 tokens on one character


class Person(BaseModel):
    """Bounded strings of plain characters and bounded lists: at most ~120 tokens, so every document closes
    within max_tokens and each parse succeeds by construction (maxLength alone allows escapes, and a
    small model once spent 200 tokens inside these strings)."""

    name: str = Field(max_length=30, pattern=PLAIN)
    age: int = Field(ge=0, le=120)
    hobbies: list[Annotated[str, Field(max_length=20, pattern=PLAIN)]] = Field(max_length=3)


class Weather(BaseModel):
    city: str = Field(max_length=20, pattern=PLAIN)
    unit: Literal["celsius", "fahrenheit"]


SUBJECTS = ["a baker in Lyon", "a retired astronaut", "a chess champion", "a taxi driver"]


@pytest.mark.parametrize("stream", [False, True])
def test_parse_returns_a_pydantic_object_for_every_prompt(client: openai.OpenAI, stream: bool) -> None:
    for subject in SUBJECTS:
        messages: Any = [{"role": "user", "content": f"Describe {subject}."}]
        if stream:
            with client.chat.completions.stream(model=MODEL, messages=messages, response_format=Person, max_tokens=200) as events:
                completion = events.get_final_completion()
        else:
            completion = client.chat.completions.parse(model=MODEL, messages=messages, response_format=Person, max_tokens=200)
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(completion.choices[0].message.parsed, Person), completion


def test_a_tool_round_trip_with_required_and_a_named_function(client: openai.OpenAI) -> None:
    tools: Any = [openai.pydantic_function_tool(Weather, name="get_weather", description="Current weather in a city")]
    messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.parse(
            model=MODEL, messages=messages, tools=tools, tool_choice=choice, parallel_tool_calls=False, max_tokens=100
        )
        assert r.choices[0].finish_reason == "tool_calls"
        [call] = r.choices[0].message.tool_calls or []
        assert call.function.name == "get_weather" and isinstance(call.function.parsed_arguments, Weather)
    answer = r.choices[0].message
    history = [
        *messages,
        answer.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
    ]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=tools, max_tokens=20)
    assert final.choices[0].finish_reason in ("stop", "length") and final.usage is not None
    assert r.usage is not None and final.usage.prompt_tokens > r.usage.prompt_tokens, "the call and its result are in the prompt"


def test_the_stream_helper_assembles_streamed_tool_calls(client: openai.OpenAI) -> None:
    tools: Any = [openai.pydantic_function_tool(Weather, name="get_weather")]
    messages: Any = [{"role": "user", "content": "Weather in Oslo, please."}]
    kwargs: Any = dict(model=MODEL, messages=messages, tools=tools, tool_choice="required", parallel_tool_calls=False)
    with client.chat.completions.stream(max_tokens=100, **kwargs) as events:
        done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
        completion = events.get_final_completion()
    [call] = completion.choices[0].message.tool_calls or []
    assert completion.choices[0].finish_reason == "tool_calls"
    assert isinstance(call.function.parsed_arguments, Weather) and [d.name for d in done] == ["get_weather"]
    whole = client.chat.completions.create(max_tokens=100, **kwargs, temperature=0)
    streamed = client.chat.completions.create(max_tokens=100, stream=True, **kwargs, temperature=0)
    arguments = "".join(
        part.function.arguments or "" for chunk in streamed for part in chunk.choices[0].delta.tool_calls or [] if part.function
    )
    assert arguments == (whole.choices[0].message.tool_calls or [])[0].function.arguments


def test_invalid_schemas_and_unknown_tools_are_400(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    bad_schema: Any = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}},
    }
    with pytest.raises(openai.BadRequestError, match="nope"):
        client.chat.completions.create(model=MODEL, messages=messages, response_format=bad_schema)
    tools: Any = [openai.pydantic_function_tool(Weather, name="get_weather")]
    with pytest.raises(openai.BadRequestError, match="get_time"):
        client.chat.completions.create(
            model=MODEL, messages=messages, tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}}
        )


def test_sigterm_drains_running_requests_then_exits(server: str) -> None:
    """Runs last: SIGTERM makes the server refuse new work (503 draining) but finish the running stream."""
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 30, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server, headers=headers, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            _PROCESSES[server].send_signal(signal.SIGTERM)
            time.sleep(0.3)
            health = http.get("/health")
            assert health.status_code == 503 and health.json() == {"status": "draining"}
            assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 503
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
    assert _PROCESSES[server].wait(timeout=20) == 0
