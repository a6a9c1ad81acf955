"""The exact byte-level BPE engine (Llama 3, GGUF `gpt2` vocabularies, HF tokenizer.json) on tiktoken.

`BPETokenizer` wraps a tiktoken `Encoding` so that it gives the ids HF `tokenizers` gives;
`bpe_from_vocab` turns a byte-level vocabulary + merge list (GGUF or tokenizer.json) into one. The
pre-tokenizer patterns here are the ones proven exact; the file-format modules pick among them.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal, Sequence

import regex
import tiktoken

from model.tokenizer.base import TokenizerError
from model.tokenizer.common import (
    _BYTE,
    _CONTROL,
    _NORMAL,
    _UNKNOWN,
    _USER_DEFINED,
    _alternation,
    _byte_piece,
    _IdTable,
    _scrub,
    _stop_ids,
)

# A Unicode normalization form, as unicodedata.normalize names it (HF's NFC normalizer: Qwen2).
UnicodeForm = Literal["NFC", "NFD", "NFKC", "NFKD"]

# Pre-tokenizer patterns, each proven against HF `tokenizers` on the same vocabulary (tests).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# HF Digits(individual_digits=True) then ByteLevel: a digit ends a whitespace run as well.
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _byte_level_table() -> dict[int, int]:
    """GPT-2's byte<->unicode map as a str.translate table: byte-level char -> the byte's code point.

    Code points below 256 that are not byte-level chars map to U+FFFF so latin-1 encoding rejects them.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + n
    table = {c: 0xFFFF for c in range(256)}
    table.update({c: b for b, c in chars.items()})
    return table


_BYTE_LEVEL = _byte_level_table()


def byte_level_bytes(token: str) -> bytes | None:
    """The bytes a byte-level BPE token string stands for, or None if it is not byte-level text."""
    try:
        return token.translate(_BYTE_LEVEL).encode("latin-1")
    except UnicodeEncodeError:
        return None


class BPETokenizer(_IdTable):
    """Byte-level BPE on tiktoken, exact against HF `tokenizers` for the supported pre-tokenizers.

    tiktoken merges by the rank of the merged bytes; HF merges by merge order. They agree when ranks
    follow merge order, so ranks are the ids when the vocabulary allows it, else remapped (rank_to_id).
    Bytes with no single-byte token make tiktoken panic; HF drops them (or emits unk) before merging,
    and so does the slow path here.
    """

    def __init__(
        self,
        *,
        name: str,
        ranks: dict[bytes, int],
        pattern: str,
        id_bytes: list[bytes],
        special_tokens: dict[str, int],
        text_tokens: dict[str, int] | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        stop_ids: frozenset[int] = frozenset(),
        rank_to_id: list[int] | None = None,
        normalization: UnicodeForm | None = None,
        unk_id: int | None = None,
        fuse_unk: bool = False,
    ) -> None:
        self.name = name
        self.vocab_size = len(id_bytes)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.stop_ids = frozenset(stop_ids)
        self.special_tokens = dict(special_tokens)  # control tokens: matched only with allow_special
        self._text_tokens = dict(text_tokens or {})  # added non-special tokens: always matched, rendered
        self._id_bytes = id_bytes
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self._rank_to_id = rank_to_id
        self._normalization = normalization
        self._unk_id, self._fuse_unk = unk_id, fuse_unk
        missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
        self._missing = missing
        char_class = b"[" + b"".join(re.escape(bytes([b])) for b in missing) + b"]"
        self._missing_re = re.compile(char_class) if missing else None
        self._unk_split = re.compile(b"(" + char_class + (b"+)" if fuse_unk else b")")) if missing else None
        self._pieces_re: regex.Pattern[str] | None = regex.compile(pattern) if missing else None
        self._split_plain = _alternation(list(self._text_tokens))
        self._split_special = _alternation([*self._text_tokens, *self.special_tokens])
        self._matchable = {**self.special_tokens, **self._text_tokens}

    def encode(self, text: str, *, bos: bool = False, allow_special: bool = False) -> list[int]:
        text = _scrub(text)
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        splitter = self._split_special if allow_special else self._split_plain
        if splitter is None:
            return ids + self._encode_plain(text)
        start = 0
        for match in splitter.finditer(text):
            ids += self._encode_plain(text[start : match.start()])
            ids.append(self._matchable[match.group()])
            start = match.end()
        return ids + self._encode_plain(text[start:])

    def decode(self, ids: Sequence[int]) -> str:
        self._check_ids(ids)
        return b"".join([self._id_bytes[i] for i in ids]).decode("utf-8", errors="replace")

    def _encode_plain(self, text: str) -> list[int]:
        """Text without added tokens -> ids."""
        if not text:
            return []
        if self._normalization:
            text = unicodedata.normalize(self._normalization, text)
        if self._missing_re is not None and self._missing_re.search(text.encode("utf-8")):
            return self._encode_missing(text)
        return self._ids(self._enc.encode_ordinary(text))

    def _encode_missing(self, text: str) -> list[int]:
        """Slow path for text holding bytes without a token: pre-tokenize here, then BPE each piece."""
        assert self._pieces_re is not None
        ids: list[int] = []
        for piece in self._pieces_re.findall(text):
            data = piece.encode("utf-8")
            if self._unk_id is None:  # HF without unk: the byte is not a symbol, its neighbours may merge
                data = data.translate(None, self._missing)
                ids += self._ids(self._enc._encode_single_piece(data)) if data else []
                continue
            assert self._unk_split is not None
            for part in self._unk_split.split(data):
                if part and part[0] in self._missing:
                    ids.append(self._unk_id)
                elif part:
                    ids += self._ids(self._enc._encode_single_piece(part))
        return ids

    def _ids(self, ranks: list[int]) -> list[int]:
        table = self._rank_to_id
        return ranks if table is None else [table[r] for r in ranks]


def bpe_from_vocab(
    *,
    name: str,
    tokens: Sequence[str],
    merges: Sequence[tuple[str, str]],
    pattern: str,
    types: Sequence[int] | None = None,
    normalization: UnicodeForm | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    unk_id: int | None = None,
    fuse_unk: bool = False,
    extra_stop_ids: Sequence[int] = (),
) -> BPETokenizer:
    """A byte-level vocabulary (tokens in GPT-2's unicode form, id = index) + merges -> BPETokenizer.

    Control / unknown tokens become special tokens (rendered as nothing), user-defined ones text tokens
    (always matched, rendered as their text). Only single bytes and merge results are mergeable: HF
    never produces any other vocabulary entry, so tiktoken must not either.
    """
    id_bytes: list[bytes] = []
    specials: dict[str, int] = {}
    text_tokens: dict[str, int] = {}
    normal: dict[str, int] = {}  # byte-level text -> id of the tokens BPE can produce
    for i, tok in enumerate(tokens):
        kind = types[i] if types is not None else _NORMAL
        if kind == _NORMAL:
            data = byte_level_bytes(tok)
            if data is not None:
                normal.setdefault(tok, i)
            id_bytes.append(data if data is not None else tok.encode())  # not byte-level: never produced
        elif kind == _USER_DEFINED:
            text_tokens[tok] = i
            id_bytes.append(tok.encode())
        elif kind == _BYTE:
            id_bytes.append(_byte_piece(tok) or b"")
        else:
            if kind in (_CONTROL, _UNKNOWN):
                specials[tok] = i
            id_bytes.append(b"")
    singles = [i for i in normal.values() if len(id_bytes[i]) == 1]
    merged: list[int] = []
    seen: set[int] = set()
    for left, right in merges:
        merged_id = normal.get(left + right)
        if merged_id is not None and merged_id not in seen:
            seen.add(merged_id)
            merged.append(merged_id)
    order = singles + merged
    if all(a < b for a, b in zip(merged, merged[1:])):
        ranks, rank_to_id = {id_bytes[i]: i for i in order}, None
    else:  # ids do not follow merge order: give tiktoken merge-ordered ranks and map back
        ranks, rank_to_id = {id_bytes[i]: r for r, i in enumerate(order)}, order
    if len(ranks) != len(order):
        raise TokenizerError(f"{name}: several mergeable tokens stand for the same bytes")
    return BPETokenizer(
        name=name,
        ranks=ranks,
        pattern=pattern,
        id_bytes=id_bytes,
        special_tokens=specials,
        text_tokens=text_tokens,
        bos_id=bos_id,
        eos_id=eos_id,
        stop_ids=_stop_ids(eos_id, specials, extra_stop_ids),
        rank_to_id=rank_to_id,
        normalization=normalization,
        unk_id=unk_id,
        fuse_unk=fuse_unk,
    )


def _split_merge(merge: str | Sequence[str]) -> tuple[str, str]:
    """A merge as "a b" (GGUF, older tokenizer.json) or ["a", "b"] (newer tokenizer.json)."""
    parts = merge.split(" ") if isinstance(merge, str) else list(merge)
    if len(parts) != 2:
        raise TokenizerError(f"malformed merge {merge!r}")
    return parts[0], parts[1]
