"""Evaluation-friendly endpoints: GET /tokenizer_info and (de)tokenize as lm-evaluation-harness's remote
tokenizer uses them, and the x-request-id header of generation responses (read by the openai SDK).

lm_eval's client is `RemoteTokenizer` / `check_remote_tokenizer_support` in lm_eval/utils.py of
EleutherAI/lm-evaluation-harness (read at commit 4e7e0d47): it strips `/v1/completions` or
`/v1/chat/completions` from the model's base_url, GETs `<base>/tokenizer_info` and reads eos_token,
bos_token, pad_token and chat_template (auto-detection only checks that the key "eos_token" exists);
encodes with POST `<base>/tokenize` {"prompt": text, "add_special_tokens": false} -> "tokens", decodes
with POST `<base>/detokenize` {"tokens": ids} -> "prompt"; eos/bos ids are `encode(token)[0]`, and
chat templates are rendered by jinja2 with StrictUndefined and only `messages` and
`add_generation_prompt`. `LmEvalClient` below does exactly those requests.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import jinja2
import openai
import pytest
import requests
import torch

from model.chat import render_chat
from model.checkpoint import LoadedModel, load_model
from model.tokenizer import ByteTokenizer
from tests.support.api import (
    IM_END,
    IM_START,
    MAX_SEQ_LEN,
    MODEL,
    assert_error,
    parse_sse,
    serve_app,
    settings,
    tiny_loaded,
    uvicorn_thread,
)
from tests.support.models import tiny_args, tiny_model

pytestmark = pytest.mark.anyio

COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
ENDPOINTS = [("/v1/completions", COMPLETION, "cmpl"), ("/v1/chat/completions", CHAT, "chatcmpl")]
GENERATED_ID = re.compile(r"(cmpl|chatcmpl)-[0-9a-f]{32}")
SMOLLM2_TEMPLATE_START = "{% for message in messages %}"  # the chat template in the SmolLM2 GGUF


class LmEvalClient:
    """The HTTP requests lm_eval's RemoteTokenizer makes, with the same URLs, bodies and response fields."""

    def __init__(self, base_url: str, auth_token: str | None = None) -> None:
        self.base = base_url.replace("/v1/completions", "").replace("/v1/chat/completions", "").rstrip("/")
        self.session = requests.Session()
        self.session.headers.update({"Content-Type": "application/json"})
        if auth_token:
            self.session.headers["Authorization"] = f"Bearer {auth_token}"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.session.request(method, f"{self.base}{path}", timeout=30, **kwargs)
        resp.raise_for_status()
        return resp.json()

    def supported(self) -> bool:  # check_remote_tokenizer_support
        info = self._call("GET", "/tokenizer_info")
        tokens = self._call("POST", "/tokenize", json={"prompt": "test", "add_special_tokens": False}).get("tokens")
        return isinstance(info, dict) and "eos_token" in info and isinstance(tokens, list)

    @property
    def info(self) -> dict[str, Any]:
        return self._call("GET", "/tokenizer_info")  # type: ignore[no-any-return]

    def encode(self, text: str) -> list[int]:
        tokens = self._call("POST", "/tokenize", json={"prompt": text, "add_special_tokens": False}).get("tokens")
        assert isinstance(tokens, list)
        return tokens

    def decode(self, tokens: list[int]) -> str:
        prompt = self._call("POST", "/detokenize", json={"tokens": tokens}).get("prompt")
        assert isinstance(prompt, str)
        return prompt

    def token_id(self, name: str) -> int | None:  # eos_token_id / bos_token_id
        token = self.info.get(name)
        return None if token is None else self.encode(token)[0]


def render_like_lm_eval(template: str, messages: list[dict[str, str]]) -> str:
    env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


# --------------------------------------------------------------------------------------------------
# /tokenizer_info
# --------------------------------------------------------------------------------------------------


async def test_tokenizer_info_of_the_test_model() -> None:
    async with serve_app() as client:
        r = await client.get("/tokenizer_info")
        assert r.status_code == 200
        assert r.json() == {
            "tokenizer_class": "ByteTokenizer",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": None,
            "bos_token_id": IM_START,
            "eos_token_id": IM_END,
            "pad_token_id": None,
            "add_bos_token": False,
            "model_max_length": MAX_SEQ_LEN,
            "vocab_size": 259,
            "chat_template": None,
        }
        head = await client.head("/tokenizer_info")
        assert head.status_code == 200 and head.headers["content-type"] == "application/json"


def loaded_with(tokenizer: ByteTokenizer, chat_template: str | None = None) -> LoadedModel:
    model = tiny_model(max_seq_len=MAX_SEQ_LEN, vocab_size=tokenizer.vocab_size)
    return LoadedModel(model, tokenizer, tiny_args(vocab_size=tokenizer.vocab_size), MODEL, chat_template)


async def test_tokenizer_info_template_pad_and_missing_tokens() -> None:
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tokenizer = ByteTokenizer(("<s>", "</s>", "<pad>"))
    tokenizer.pad_id = 258  # type: ignore[attr-defined]  # the protocol has no pad token; one that has it is used
    async with serve_app(loaded=loaded_with(tokenizer, template)) as client:
        info = (await client.get("/tokenizer_info")).json()
        assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", "<pad>")
        assert (info["bos_token_id"], info["eos_token_id"], info["pad_token_id"]) == (256, 257, 258)
        assert info["chat_template"] == template
    async with serve_app(loaded=loaded_with(ByteTokenizer(()))) as client:  # no control tokens at all
        info = (await client.get("/tokenizer_info")).json()
        assert info["bos_token"] is None and info["eos_token"] is None and info["pad_token"] is None
        assert info["bos_token_id"] is None and info["eos_token_id"] is None and "eos_token" in info


async def test_tokenizer_info_needs_the_api_key_like_tokenize() -> None:
    async with serve_app(settings(api_key="sk-test")) as client:
        assert_error(await client.get("/tokenizer_info"), 401)
        r = await client.get("/tokenizer_info", headers={"Authorization": "Bearer sk-test"})
        assert r.status_code == 200 and r.json()["eos_token"] == "<|im_end|>"


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> LoadedModel:
    return load_model(str(smollm2_path), device="cpu", dtype=torch.float32, max_batch_size=2, max_seq_len=256)


@pytest.fixture
async def smollm2_client(smollm2: LoadedModel) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_app(loaded=smollm2) as client:
        yield client


async def test_tokenizer_info_of_smollm2(smollm2: LoadedModel, smollm2_client: httpx.AsyncClient) -> None:
    info = (await smollm2_client.get("/tokenizer_info")).json()
    # HF's tokenizer_config.json of SmolLM2-135M-Instruct: bos <|im_start|>, eos <|im_end|>
    assert (info["bos_token"], info["bos_token_id"]) == ("<|im_start|>", 1)
    assert (info["eos_token"], info["eos_token_id"]) == ("<|im_end|>", 2)
    assert (info["pad_token"], info["pad_token_id"]) == ("<|im_end|>", 2)  # the GGUF's padding_token_id, HF's pad_token
    assert info["tokenizer_class"] == "BPETokenizer" and info["vocab_size"] == 49152
    assert info["model_max_length"] == 256 and info["add_bos_token"] is False
    assert info["chat_template"] == smollm2.chat_template and info["chat_template"].startswith(SMOLLM2_TEMPLATE_START)
    for name in ("bos_token", "eos_token"):  # lm_eval: token id = encode(token)[0]
        r = await smollm2_client.post("/tokenize", json={"prompt": info[name], "add_special_tokens": False})
        assert r.json()["tokens"] == [info[f"{name}_id"]]


async def test_smollm2_template_rendered_by_lm_eval_tokenizes_to_our_chat_prompt(
    smollm2: LoadedModel, smollm2_client: httpx.AsyncClient
) -> None:
    """lm_eval renders the served chat_template itself, then tokenizes it remotely: the ids must be the ones
    /v1/chat/completions builds for the same messages, and /detokenize must give the text back."""
    template = (await smollm2_client.get("/tokenizer_info")).json()["chat_template"]
    state = smollm2_client.app.state.server  # type: ignore[attr-defined]
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Ça va ?"},
        ],
    ]
    for messages in conversations:
        text = render_like_lm_eval(template, messages)
        ids = (await smollm2_client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})).json()["tokens"]
        assert ids == render_chat(messages, smollm2.tokenizer, state.chat_format, default_system=state.default_system)
        assert (await smollm2_client.post("/detokenize", json={"tokens": ids})).json() == {"prompt": text}
        body = {"model": smollm2.name, "messages": messages, "max_tokens": 1}
        r = await smollm2_client.post("/v1/chat/completions", json=body)
        assert r.json()["usage"]["prompt_tokens"] == len(ids)


# --------------------------------------------------------------------------------------------------
# (de)tokenize as lm_eval calls them, over real HTTP
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_server() -> Iterator[str]:
    with uvicorn_thread(settings(api_key="sk-eval"), tiny_loaded()) as (url, _):
        yield url


def test_lm_eval_remote_tokenizer_round_trip(lm_eval_server: str) -> None:
    tok = LmEvalClient(f"{lm_eval_server}/v1/completions", auth_token="sk-eval")
    assert tok.base == lm_eval_server
    assert tok.supported()
    assert LmEvalClient(f"{lm_eval_server}/v1/chat/completions", auth_token="sk-eval").supported()
    with pytest.raises(requests.HTTPError):  # without the key: 401, so lm_eval falls back to a local tokenizer
        LmEvalClient(lm_eval_server).supported()
    assert tok.token_id("eos_token") == IM_END and tok.token_id("bos_token") == IM_START
    assert tok.info["pad_token"] is None and tok.info["chat_template"] is None
    for text in ["", "Hello, world", "héllo wörld ✓", "Question: 2+2?\nAnswer:", "a<|im_end|>b <|im_start|>user\n"]:
        ids = tok.encode(text)
        assert ids == tiny_loaded().tokenizer.encode(text, allow_special=True)  # no BOS: add_special_tokens false
        assert tok.decode(ids) == text  # lossless, control tokens included (lm_eval assumes it)
    assert tok.encode("x<|im_end|>") == [ord("x"), IM_END]
    assert tok.decode([ord("o"), ord("k"), IM_END, IM_START]) == "ok<|im_end|><|im_start|>"
    assert [tok.decode(ids) for ids in [[104, 105], [IM_END]]] == ["hi", "<|im_end|>"]  # batch_decode


async def test_lm_eval_stop_lists_with_the_eos_text_appended_are_accepted() -> None:
    """lm-eval adds the EOS text to a task's own stop list (often 4 already): OpenAI's limit of 4
    would answer 400 to those tasks."""
    stops = ["\n\n", "Question:", "</s>", "<|im_end|>", "<|endoftext|>"]
    async with serve_app() as client:
        r = await client.post("/v1/completions", json={**COMPLETION, "stop": stops})
        assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------------------
# x-request-id
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "prefix"), ENDPOINTS)
async def test_request_id_header_equals_body_id(path: str, body: dict[str, Any], prefix: str) -> None:
    async with serve_app() as client:
        ids = set()
        for _ in range(2):
            r = await client.post(path, json=body)
            assert r.status_code == 200, r.text
            rid = r.headers["x-request-id"]
            assert rid == r.json()["id"] and GENERATED_ID.fullmatch(rid) and rid.startswith(prefix + "-")
            ids.add(rid)
        assert len(ids) == 2  # a fresh id per request


@pytest.mark.parametrize(("path", "body", "prefix"), ENDPOINTS)
async def test_request_id_header_on_streams(path: str, body: dict[str, Any], prefix: str) -> None:
    async with serve_app() as client:
        for extra in ({"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}):
            r = await client.post(path, json={**body, **extra})
            events, done, _ = parse_sse(r.text)
            assert r.status_code == 200 and done and events
            rid = r.headers["x-request-id"]
            assert rid.startswith(prefix + "-") and {e["id"] for e in events} == {rid}


SANE_IDS = ["abc", "trace-42", "A.b_c:d-9", "0" * 128, "f47ac10b-58cc-4372-a567-0e02b2c3d479"]
UNSAFE_IDS: list[str | bytes] = [
    "",
    "x" * 129,
    "a b",
    "id;drop",
    "<script>",
    "a/b",
    "a\tb",
    "évian".encode(),
    "x" * 100_000,
    "id%0d%0aX-Evil:1",
]


@pytest.mark.parametrize(("path", "body", "prefix"), ENDPOINTS)
async def test_client_request_id_accepted_when_sane(path: str, body: dict[str, Any], prefix: str) -> None:
    async with serve_app() as client:
        for sent in SANE_IDS:
            r = await client.post(path, json=body, headers={"X-Request-Id": sent})
            assert r.headers["x-request-id"] == r.json()["id"] == f"{prefix}-{sent}"  # vLLM: prefix + the client's id
        r = await client.post(path, json={**body, "stream": True}, headers={"x-request-id": "stream-7"})
        events, done, _ = parse_sse(r.text)
        assert done and r.headers["x-request-id"] == f"{prefix}-stream-7"
        assert {e["id"] for e in events} == {f"{prefix}-stream-7"}


@pytest.mark.parametrize(("path", "body", "prefix"), ENDPOINTS)
async def test_client_request_id_replaced_when_unsafe_or_huge(path: str, body: dict[str, Any], prefix: str) -> None:
    async with serve_app(settings(max_body_bytes=1 << 20)) as client:
        for sent in UNSAFE_IDS:
            raw = sent if isinstance(sent, bytes) else sent.encode()
            r = await client.post(path, json=body, headers=[(b"x-request-id", raw)])
            assert r.status_code == 200, r.text
            rid = r.headers["x-request-id"]
            assert rid == r.json()["id"] and GENERATED_ID.fullmatch(rid) and rid.startswith(prefix + "-"), sent


async def test_request_id_header_on_error_responses() -> None:
    loaded = tiny_loaded()
    async with serve_app(settings(api_key="sk-test", max_body_bytes=2000), loaded) as client:
        key = {"Authorization": "Bearer sk-test"}
        checks = [
            (await client.post("/v1/completions", json=COMPLETION), 401),
            (await client.post("/v1/completions", json={**COMPLETION, "model": "other"}, headers=key), 404),
            (await client.post("/v1/chat/completions", json={**CHAT, "messages": []}, headers=key), 400),
            (await client.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 5000}, headers=key), 413),
            (await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 10_000}, headers=key), 400),
        ]
        for r, status in checks:
            assert_error(r, status)
            assert GENERATED_ID.fullmatch(r.headers["x-request-id"]), (status, r.headers)
        r = await client.post("/v1/chat/completions", json={**CHAT, "n": 0}, headers={**key, "x-request-id": "bad-n"})
        assert_error(r, 400, param="n")
        assert r.headers["x-request-id"] == "chatcmpl-bad-n"

        def broken(*args: Any, **kwargs: Any) -> list[int]:
            raise RuntimeError("secret internal detail")

        original = loaded.tokenizer.encode
        loaded.tokenizer.encode = broken  # type: ignore[method-assign]
        try:
            r = await client.post("/v1/completions", json=COMPLETION, headers={**key, "x-request-id": "boom"})
        finally:
            loaded.tokenizer.encode = original  # type: ignore[method-assign]
        assert assert_error(r, 500)["type"] == "server_error" and "secret" not in r.text
        assert r.headers["x-request-id"] == "cmpl-boom"
        r = await client.post("/v1/completions", json=COMPLETION, headers=key)
        assert r.status_code == 200  # still serving
        assert "x-request-id" not in (await client.post("/tokenize", json={"prompt": "a"}, headers=key)).headers


async def test_request_id_in_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with serve_app() as client:
        r = await client.post("/v1/completions", json=COMPLETION, headers={"x-request-id": "trace-me-1"})
        assert r.json()["id"] == "cmpl-trace-me-1"
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"x-request-id": "trace-me-2"})
        assert parse_sse(r.text)[1]
        r = await client.post("/v1/completions", json={**COMPLETION, "model": "other"}, headers={"x-request-id": "trace-me-3"})
        assert r.status_code == 404
    lines = [rec.getMessage() for rec in caplog.records]

    def about(rid: str) -> list[str]:
        return [line for line in lines if line.startswith(rid + ": ")]

    for rid in ("cmpl-trace-me-1", "chatcmpl-trace-me-2"):
        start, end = about(rid)
        assert re.match(rf"{rid}: started as engine request\(s\) {rid}: \d+ prompt token\(s\), max_tokens 3$", start), start
        finished = rf"{rid}: finished with status 200 in [\d.]+ s \(finish_reason (stop|length); \d completion token"
        assert re.match(finished, end), end
    rejected, end = about("cmpl-trace-me-3")
    assert rejected.startswith("cmpl-trace-me-3: rejected with 404 model_not_found: The model `other` does not exist.")
    assert end.startswith("cmpl-trace-me-3: finished with status 404 in ")


async def test_cors_exposes_the_request_id_header() -> None:
    origin = "http://app.example"
    async with serve_app(settings(cors_origins=[origin])) as client:
        r = await client.post("/v1/completions", json=COMPLETION, headers={"Origin": origin})
        assert r.headers["access-control-allow-origin"] == origin
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        assert r.headers["x-request-id"] == r.json()["id"]


# --------------------------------------------------------------------------------------------------
# The openai SDK reads the header as `_request_id`
# --------------------------------------------------------------------------------------------------


def test_openai_sdk_request_id(lm_eval_server: str) -> None:
    client = openai.OpenAI(base_url=f"{lm_eval_server}/v1", api_key="sk-eval", max_retries=0, timeout=30)
    completion = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    assert completion._request_id is not None and completion._request_id == completion.id
    assert completion.id.startswith("cmpl-")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat._request_id is not None and chat._request_id == chat.id and chat.id.startswith("chatcmpl-")
    mine = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, extra_headers={"X-Request-Id": "eval-run-1"}
    )
    assert mine._request_id == mine.id == "chatcmpl-eval-run-1"
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True)
    chunks = list(stream)
    assert chunks and {c.id for c in chunks} == {stream.response.headers["x-request-id"]}
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert raw.request_id == raw.parse().id
    with pytest.raises(openai.NotFoundError) as failed:
        client.completions.create(model="other", prompt="Hi", max_tokens=2)
    assert failed.value.request_id is not None and failed.value.request_id.startswith("cmpl-")
