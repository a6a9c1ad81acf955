"""Logprobs in the two wire shapes: the legacy completions object and chat's content list."""

from __future__ import annotations

import math
from typing import Any, Callable

from app.protocol.responses import CompletionLogprobs, TokenLogprobEntry, TopLogprob
from app.protocol.token_text import TokenTexts, readable
from model.tokenizer import IncrementalDetokenizer, Tokenizer

LOGPROB_FLOOR = -9999.0  # what JSON gets instead of -inf (vLLM's choice; the engine clamps there too)


def safe_logprob(value: float) -> float:
    """JSON has no -inf or NaN: clamp as vLLM does."""
    return value if math.isfinite(value) else LOGPROB_FLOOR


class LegacyLogprobs:
    """Builds the legacy completion logprobs of one choice, chunk by chunk.

    Each token is written as the text it adds, so that joined they are the returned text; text_offset is
    each token's character offset in that text (with echo, from the start of the prompt). Generated tokens
    take theirs from the engine, which counts them on the text it sends.
    """

    def __init__(self, tokenizer: Tokenizer, echo_text: str = "") -> None:
        self.names = TokenTexts(tokenizer)
        self.tokenizer = tokenizer
        self.start = len(echo_text)  # where the generated text begins

    def prompt(self, prompt_ids: list[int], entries: list[Any] | None, echo_text: str) -> CompletionLogprobs:
        """The echoed prompt's logprobs (entry 0 and any missing entry null).

        A control token spans its name where the echoed text spells it out (a text prompt with
        "<|im_start|>" in it); an added BOS is not in the text, so it is "" and spans nothing. Other
        tokens span what the detokenizer gives (a split character lands on its last token).
        """
        out = CompletionLogprobs()
        detok, offset = IncrementalDetokenizer(self.tokenizer), 0
        entries = entries or []
        for k, token_id in enumerate(prompt_ids):
            entry = entries[k] if k < len(entries) else None
            token, piece = self._echoed(token_id, echo_text, offset), detok.push(token_id)
            self._append(out, token, entry, offset, self.names.named)
            offset += len(token) if token_id in self.names.specials else len(piece)
        return out

    def generated(self, entries: list[Any], text_offsets: list[int]) -> CompletionLogprobs:
        """Logprobs of generated tokens (engine TokenLogprob objects) with the engine's text offsets.

        A control token adds nothing to generated text, so it (and any control alternative) is "".
        """
        out = CompletionLogprobs()
        for entry, offset in zip(entries, text_offsets):
            self._append(out, self.names.emitted(entry.token_id), entry, self.start + offset, self.names.emitted)
        return out

    def _echoed(self, token_id: int, echo_text: str, offset: int) -> str:
        """A prompt token as the echo shows it: a control token by name only where the text spells it."""
        name = self.names.specials.get(token_id)
        return name if name is not None and echo_text.startswith(name, offset) else self.names.emitted(token_id)

    @staticmethod
    def _append(out: CompletionLogprobs, token: str, entry: Any, offset: int, text_of: Callable[[int], str]) -> None:
        """One position: `token` as the text shows it, its alternatives written by `text_of`."""
        out.tokens.append(token)
        out.text_offset.append(offset)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            return
        chosen = safe_logprob(entry.logprob)
        top: dict[str, float] = {}
        for t, lp in entry.top:  # best first: where alternatives share a string ("" of control tokens), the likeliest
            top.setdefault(text_of(t), safe_logprob(lp))
        top[token] = chosen  # the chosen token is always listed, with its own logprob
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
    """Chat-shaped logprobs: token, logprob, bytes, and the top_n alternatives.

    Tokens are the text they add to the message, so a control token is "" with no bytes.
    """
    names = TokenTexts(tokenizer)

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        raw = names.emitted_bytes(token_id)
        return {"token": readable(raw), "logprob": safe_logprob(logprob), "bytes": list(raw)}

    return [
        TokenLogprobEntry(**item(e.token_id, e.logprob), top_logprobs=[TopLogprob(**item(t, lp)) for t, lp in e.top[:top_n]])
        for e in entries
    ]
