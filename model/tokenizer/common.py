"""Plumbing that the vocabulary-backed tokenizers (BPE and SentencePiece) and their loaders share.

Token types as GGUF / SentencePiece number them, the control tokens that end a generation, the id ->
bytes table with range checks, lone-surrogate scrubbing and the longest-first special-token regex.
Kept apart so that no implementation module has to import another one for these.
"""

from __future__ import annotations

import re
from typing import Sequence

# Control-token texts that end a generation whenever a vocabulary has them.
_STOP_TEXTS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>")

# GGUF / SentencePiece token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _byte_piece(piece: str) -> bytes | None:
    """b"\\xAB" for a byte-fallback piece "<0xAB>", else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    return None


def _scrub(text: str) -> str:
    """Lone surrogates cannot be encoded as UTF-8: replace them with U+FFFD (as tiktoken does)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _alternation(texts: Sequence[str]) -> re.Pattern[str] | None:
    """A regex matching any of texts, longest first at each position (so `<|a|>x` beats `<|a|>`)."""
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


class _IdTable:
    """Id -> bytes table shared by the implementations, with range checks that give clear errors."""

    _id_bytes: list[bytes]
    vocab_size: int
    pad_id: int | None = None  # the checkpoint's padding token, where it names one (GET /tokenizer_info shows it)

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return self._id_bytes[token_id]

    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range [0, {self.vocab_size})")


def _stop_ids(eos_id: int | None, specials: dict[str, int], extra: Sequence[int] = ()) -> frozenset[int]:
    stops = {specials[t] for t in _STOP_TEXTS if t in specials} | set(extra)
    return frozenset(stops | ({eos_id} if eos_id is not None else set()))
