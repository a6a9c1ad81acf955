"""Logprob tokens, text offsets and text agree, also when control tokens are generated (issue 12, item 8).

A generated control token adds nothing to the text, so its logprobs token is "" (vLLM with
skip_special_tokens does the same): joined, the tokens are the text, and text_offset[i] (in characters)
is the length of the text before token i, whole or streamed chunk by chunk.
"""

from __future__ import annotations

from typing import Any

import pytest

from model.checkpoint import LoadedModel
from model.tokenizer import ByteTokenizer
from tests.support.api import (
    CHATML_SPECIALS,
    ENDOFTEXT,
    IM_END,
    IM_START,
    MAX_SEQ_LEN,
    MODEL,
    chatml_count,
    parse_sse,
    serve_app,
    tiny_loaded,
)
from tests.support.models import ScriptedModel, tiny_args

pytestmark = pytest.mark.anyio

# "a" <|im_start|> "b" <|im_end|>: a control token inside the text, then the end of turn;
# <|endoftext|> is every step's runner-up (and comes next once the script is done, with ignore_eos).
GENERATED = [ord("a"), IM_START, ord("b"), IM_END]


def scripted(prompt_len: int, add_bos: bool = False) -> LoadedModel:
    tokenizer = ByteTokenizer(CHATML_SPECIALS)
    if add_bos:
        tokenizer.add_bos = True  # type: ignore[attr-defined]  # what a GGUF's add_bos_token says
    model = ScriptedModel(GENERATED, prompt_len, fallback=ENDOFTEXT)
    return LoadedModel(model, tokenizer, tiny_args(), MODEL, None)  # type: ignore[arg-type]


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "temperature": 0, "logprobs": 2, **fields}


def assert_agree(text: str, lp: dict[str, Any], start: int = 0) -> None:
    """Tokens join to the text; each offset is `start` plus the length of the text before its token."""
    tokens, offsets = lp["tokens"], lp["text_offset"]
    assert "".join(tokens) == text, (tokens, text)
    assert offsets == [start + len("".join(tokens[:i])) for i in range(len(tokens))], (tokens, offsets)
    for token, logprob, top in zip(tokens, lp["token_logprobs"], lp["top_logprobs"]):
        assert top is None or top[token] == pytest.approx(logprob), (token, logprob, top)


async def completions(body: dict[str, Any], loaded: LoadedModel) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The whole choice, and the chunks of the same request streamed."""
    async with serve_app(loaded=loaded) as client:
        whole = (await client.post("/v1/completions", json=body)).json()["choices"][0]
        events, done, _ = parse_sse((await client.post("/v1/completions", json={**body, "stream": True})).text)
    assert done
    return whole, [e["choices"][0] for e in events if e["choices"]]


def assert_stream_agrees(whole: dict[str, Any], chunks: list[dict[str, Any]]) -> None:
    """Every chunk agrees with the text streamed before it, and all of them with the whole response."""
    sent = ""
    for chunk in chunks:
        assert_agree(chunk["text"], chunk["logprobs"], start=len(sent))
        sent += chunk["text"]
    assert sent == whole["text"]
    assert [t for c in chunks for t in c["logprobs"]["tokens"]] == whole["logprobs"]["tokens"]
    assert [o for c in chunks for o in c["logprobs"]["text_offset"]] == whole["logprobs"]["text_offset"]


async def test_generated_control_tokens_are_empty_tokens_at_the_offset_they_add_nothing_to() -> None:
    whole, chunks = await completions(completion(), scripted(prompt_len=2))
    assert whole["text"] == "ab" and whole["finish_reason"] == "stop"
    lp = whole["logprobs"]
    assert lp["tokens"] == ["a", "", "b", ""] and lp["text_offset"] == [0, 1, 1, 2]
    assert_agree(whole["text"], lp)
    assert_stream_agrees(whole, chunks)


async def test_control_alternatives_are_empty_and_the_chosen_token_keeps_its_logprob() -> None:
    """<|im_start|> chosen with <|endoftext|> runner-up: both are "", and "" maps to the chosen one's logprob."""
    whole, _ = await completions(completion(), scripted(prompt_len=2))
    lp = whole["logprobs"]
    assert set(lp["top_logprobs"][0]) == {"a", ""}  # <|endoftext|> is the runner-up of "a"
    assert lp["top_logprobs"][1] == {"": pytest.approx(lp["token_logprobs"][1])}
    assert lp["token_logprobs"][1] > lp["top_logprobs"][0][""]


async def test_ignore_eos_generates_on_past_control_tokens_and_the_text_still_lines_up() -> None:
    whole, chunks = await completions(completion(ignore_eos=True, max_tokens=6), scripted(prompt_len=2))
    assert whole["text"] == "ab" and whole["finish_reason"] == "length"
    assert whole["logprobs"]["tokens"] == ["a", "", "b", "", "", ""]
    assert_agree(whole["text"], whole["logprobs"])
    assert_stream_agrees(whole, chunks)


async def test_echo_with_generated_control_tokens() -> None:
    whole, chunks = await completions(completion(echo=True), scripted(prompt_len=2))
    assert whole["text"] == "Hiab"
    assert whole["logprobs"]["tokens"] == ["H", "i", "a", "", "b", ""]
    assert_agree(whole["text"], whole["logprobs"])
    assert_stream_agrees(whole, chunks)


async def test_echo_keeps_control_tokens_the_prompt_spells_out_and_empties_an_added_bos() -> None:
    """ "<|im_start|>" written in the prompt is echoed by name; a BOS the server added is not in the text."""
    whole, chunks = await completions(completion(prompt="<|im_start|>Hi", echo=True), scripted(prompt_len=3))
    assert whole["text"] == "<|im_start|>Hiab"
    assert whole["logprobs"]["tokens"][:3] == ["<|im_start|>", "H", "i"]
    assert_agree(whole["text"], whole["logprobs"])
    assert_stream_agrees(whole, chunks)
    whole, chunks = await completions(completion(echo=True), scripted(prompt_len=3, add_bos=True))
    assert whole["text"] == "Hiab"
    assert whole["logprobs"]["tokens"] == ["", "H", "i", "a", "", "b", ""]
    assert_agree(whole["text"], whole["logprobs"])
    assert_stream_agrees(whole, chunks)


def assert_chat_agrees(text: str, content: list[dict[str, Any]]) -> None:
    """Tokens join to the message; bytes are each token's UTF-8, control tokens (and alternatives) empty."""
    assert "".join(entry["token"] for entry in content) == text
    alternatives = [top for entry in content for top in entry["top_logprobs"]]
    for item in [*content, *alternatives]:
        assert item["bytes"] == list(item["token"].encode()), item


async def test_chat_logprobs_of_control_tokens_are_empty_like_their_text() -> None:
    prompt_len = chatml_count("<|im_start|>user\nhey<|im_end|>\n<|im_start|>assistant\n")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hey"}],
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    async with serve_app(loaded=scripted(prompt_len)) as client:
        whole = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
        events, done, _ = parse_sse((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
    assert done and whole["message"]["content"] == "ab"
    content = whole["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["a", "", "b", ""]
    assert [[top["token"] for top in entry["top_logprobs"]] for entry in content][0] == ["a", ""]
    assert_chat_agrees("ab", content)
    streamed = [c for e in events for c in e["choices"]]
    streamed_text = "".join(c["delta"].get("content") or "" for c in streamed)
    streamed_content = [entry for c in streamed if c.get("logprobs") for entry in c["logprobs"]["content"]]
    assert streamed_text == "ab" and streamed_content == content


@pytest.mark.parametrize("max_tokens", [0, 2])
async def test_echo_logprobs_of_a_one_token_prompt_on_a_batch_invariant_model(max_tokens: int) -> None:
    """A one-token prompt is a (1, 1) prefill whose every-position logits the decode head used to reject (a 500)."""
    loaded = tiny_loaded()
    loaded.model.setup_cache(4, MAX_SEQ_LEN, batch_invariant=True)
    async with serve_app(loaded=loaded) as client:
        response = await client.post("/v1/completions", json=completion(prompt="H", echo=True, max_tokens=max_tokens, logprobs=1))
    assert response.status_code == 200, response.text
    lp = response.json()["choices"][0]["logprobs"]
    assert lp["tokens"][0] == "H" and lp["token_logprobs"][0] is None
    assert len(lp["tokens"]) == 1 + max_tokens
