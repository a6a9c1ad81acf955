"""The tokenizer interface every part of the server codes against, and `ByteTokenizer`.

Every tokenizer maps text to ids and ids to raw bytes. Decoding is bytes-first so that streaming can
hold back an incomplete UTF-8 character instead of emitting U+FFFD (see detokenizer.py).
`ByteTokenizer` (one id per byte, a few control tokens) is the dependency-free implementation that
tests and tiny random models use; `TokenizerError` is what every loader raises.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int  # number of ids, specials included
    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]  # ids that end a generation (EOS, <|eot_id|>, <|im_end|>, ...)
    special_tokens: dict[str, int]  # text of each control token -> id

    def encode(self, text: str, *, bos: bool = False, allow_special: bool = False) -> list[int]:
        """Text to ids. Special-token text is plain text unless allow_special (no prompt injection)."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for; b"" for control tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; control tokens are not rendered; invalid UTF-8 becomes U+FFFD."""
        ...


class ByteTokenizer:
    """One id per byte plus a few control tokens: for tests and tiny random models."""

    def __init__(self, specials: Sequence[str] = ("<|bos|>", "<|eos|>", "<|eot|>")) -> None:
        self.special_tokens = {text: 256 + i for i, text in enumerate(specials)}
        self.vocab_size = 256 + len(specials)
        self.bos_id = self.special_tokens.get(specials[0]) if specials else None
        self.eos_id = self.special_tokens.get(specials[1]) if len(specials) > 1 else None
        self.stop_ids = frozenset(i for i in self.special_tokens.values() if i != self.bos_id)

    def encode(self, text: str, *, bos: bool = False, allow_special: bool = False) -> list[int]:
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        if allow_special:
            return ids + split_on_specials(text, self.special_tokens, lambda s: list(s.encode()))
        return ids + list(text.encode())

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def split_on_specials(text: str, specials: dict[str, int], encode_plain: Callable[[str], list[int]]) -> list[int]:
    """Encode text where special-token strings become their ids and the rest goes to encode_plain."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        hits = [(text.find(s, start), s) for s in specials]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            break
        pos, special = min(hits, key=lambda h: (h[0], -len(h[1])))
        if pos > start:
            ids += encode_plain(text[start:pos])
        ids.append(specials[special])
        start = pos + len(special)
    if start < len(text):
        ids += encode_plain(text[start:])
    return ids


class TokenizerError(ValueError):
    """A tokenizer file we cannot load exactly (unsupported type, missing piece, bad format)."""
