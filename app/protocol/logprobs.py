"""Logprobs in the two wire shapes: the legacy completions object and chat's content list."""

from __future__ import annotations

import math
from typing import Any

from app.protocol.responses import CompletionLogprobs, TokenLogprobEntry, TopLogprob
from app.protocol.token_text import TokenTexts
from model.tokenizer import IncrementalDetokenizer, Tokenizer

LOGPROB_FLOOR = -9999.0  # what JSON gets instead of -inf (vLLM's choice; the engine clamps there too)


def safe_logprob(value: float) -> float:
    """JSON has no -inf or NaN: clamp as vLLM does."""
    return value if math.isfinite(value) else LOGPROB_FLOOR


class LegacyLogprobs:
    """Builds the legacy completion logprobs of one choice, chunk by chunk.

    text_offset is each token's character offset in the returned text (with echo, from the start of
    the prompt). Generated tokens take theirs from the engine, which counts them on the text it sends.
    """

    def __init__(self, tokenizer: Tokenizer, echo_text: str = "") -> None:
        self.names = TokenTexts(tokenizer)
        self.tokenizer = tokenizer
        self.start = len(echo_text)  # where the generated text begins

    def prompt(self, prompt_ids: list[int], entries: list[Any] | None, echo_text: str) -> CompletionLogprobs:
        """The echoed prompt's logprobs (entry 0 and any missing entry null).

        A control token the detokenizer drops still spans its name when the echoed text spells it out
        (a text prompt with "<|im_start|>" in it); an added BOS spans nothing.
        """
        out = CompletionLogprobs()
        detok, offset = IncrementalDetokenizer(self.tokenizer), 0
        entries = entries or []
        for k, token_id in enumerate(prompt_ids):
            entry = entries[k] if k < len(entries) else None
            self._append(out, token_id, entry, offset)
            piece, name = detok.push(token_id), self.names.specials.get(token_id)
            offset += len(name) if not piece and name and echo_text.startswith(name, offset) else len(piece)
        return out

    def generated(self, entries: list[Any], text_offsets: list[int]) -> CompletionLogprobs:
        """Logprobs of generated tokens (engine TokenLogprob objects) with the engine's text offsets."""
        out = CompletionLogprobs()
        for entry, offset in zip(entries, text_offsets):
            self._append(out, entry.token_id, entry, self.start + offset)
        return out

    def _append(self, out: CompletionLogprobs, token_id: int, entry: Any, offset: int) -> None:
        out.tokens.append(self.names.text(token_id))
        out.text_offset.append(offset)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            return
        chosen = safe_logprob(entry.logprob)
        top = {self.names.text(t): safe_logprob(lp) for t, lp in entry.top}
        top.setdefault(self.names.text(token_id), chosen)  # the chosen token is always listed
        out.token_logprobs.append(chosen)
        out.top_logprobs.append(top)


def merge_logprobs(*parts: CompletionLogprobs) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for part in parts:
        out.tokens += part.tokens
        out.token_logprobs += part.token_logprobs
        out.top_logprobs += part.top_logprobs
        out.text_offset += part.text_offset
    return out


def chat_logprobs(tokenizer: Tokenizer, entries: list[Any], top_n: int) -> list[TokenLogprobEntry]:
    """Chat-shaped logprobs: token, logprob, bytes, and the top_n alternatives."""
    names = TokenTexts(tokenizer)

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": names.text(token_id), "logprob": safe_logprob(logprob), "bytes": list(names.raw(token_id))}

    return [
        TokenLogprobEntry(**item(e.token_id, e.logprob), top_logprobs=[TopLogprob(**item(t, lp)) for t, lp in e.top[:top_n]])
        for e in entries
    ]
