"""Tokenizers: one small interface, several implementations, and a streaming detokenizer.

Every tokenizer maps text to ids and ids to raw bytes. Decoding is bytes-first so that streaming can
hold back an incomplete UTF-8 character instead of emitting U+FFFD.

Implementations: `ByteTokenizer` (tests), `BPETokenizer` (byte-level BPE on tiktoken: Llama 3
tokenizer.model, GGUF `gpt2` vocabularies, HF tokenizer.json) and `SentencePieceTokenizer` (Llama 2,
TinyLlama; also GGUF `llama` vocabularies). Entry points for the checkpoint loader:
`tokenizer_from_gguf(reader)` and `tokenizer_from_dir(path)`; both raise `TokenizerError` (a
ValueError) for anything they cannot tokenize exactly.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
import struct
import unicodedata
from pathlib import Path
from typing import Any, Protocol, Sequence

import regex
import tiktoken


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


def split_on_specials(text: str, specials: dict[str, int], encode_plain) -> list[int]:  # type: ignore[no-untyped-def]
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


class IncrementalDetokenizer:
    """Turns a stream of ids into a stream of complete characters.

    Bytes of a character split across tokens are buffered until the character is complete, so the
    stream never carries U+FFFD for text that is valid when whole.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: whatever is still buffered (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


# --------------------------------------------------------------------------------------------------
# Real tokenizers. Byte-level BPE (Llama 3, GGUF `gpt2` vocabularies, HF tokenizer.json) runs on
# tiktoken; SentencePiece models (Llama 2, TinyLlama) run on the sentencepiece package.
# --------------------------------------------------------------------------------------------------


class TokenizerError(ValueError):
    """A tokenizer file we cannot load exactly (unsupported type, missing piece, bad format)."""


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
# llama.cpp `tokenizer.ggml.pre` -> (pattern, unicode normalization of the original HF tokenizer).
# NFC is Python's (Unicode 14); HF's Rust tables are older, so text with combining marks added since
# (e.g. U+07FD) can be ordered differently: 3 in 20,000 random-codepoint strings, 0 in realistic text.
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, str | None]] = {
    "gpt2": (GPT2_PATTERN, None),
    "smollm": (SMOLLM_PATTERN, None),
    "llama-bpe": (LLAMA3_PATTERN, None),
    "qwen2": (QWEN2_PATTERN, "NFC"),
}

# Llama 3.1+ special tokens in order, as Meta's tokenizer.py lists them; ids start after the base ranks.
_LLAMA3_NAMED = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool call)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_NAMED))]

# Control-token texts that end a generation whenever a vocabulary has them.
_STOP_TEXTS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>")

# GGUF / SentencePiece token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


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

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return self._id_bytes[token_id]

    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range [0, {self.vocab_size})")


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
        normalization: str | None = None,
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


def _stop_ids(eos_id: int | None, specials: dict[str, int], extra: Sequence[int] = ()) -> frozenset[int]:
    stops = {specials[t] for t in _STOP_TEXTS if t in specials} | set(extra)
    return frozenset(stops | ({eos_id} if eos_id is not None else set()))


def bpe_from_vocab(
    *,
    name: str,
    tokens: Sequence[str],
    merges: Sequence[tuple[str, str]],
    pattern: str,
    types: Sequence[int] | None = None,
    normalization: str | None = None,
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
        i = normal.get(left + right)
        if i is not None and i not in seen:
            seen.add(i)
            merged.append(i)
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


# ---- GGUF ----------------------------------------------------------------------------------------


def _gguf_get(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tokenizer_from_gguf(reader: Any) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata (reader: an open gguf.GGUFReader)."""
    kind = _gguf_get(reader, "tokenizer.ggml.model")
    tokens = _gguf_get(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError("GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    types = _gguf_get(reader, "tokenizer.ggml.token_type")
    bos_id = _gguf_get(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _gguf_get(reader, "tokenizer.ggml.eos_token_id")
    if kind == "llama":
        return _sentencepiece_from_gguf(reader, tokens, types, bos_id, eos_id)
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')")
    pre = _gguf_get(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        supported = ", ".join(sorted(GGUF_PRE_TOKENIZERS))
        raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {supported})")
    pattern, normalization = GGUF_PRE_TOKENIZERS[pre]
    merges = [_split_merge(m) for m in _gguf_get(reader, "tokenizer.ggml.merges", [])]
    return bpe_from_vocab(
        name=f"gguf-{pre}",
        tokens=tokens,
        merges=merges,
        pattern=pattern,
        types=types,
        normalization=normalization,
        bos_id=bos_id,
        eos_id=eos_id,
    )


def _sentencepiece_from_gguf(reader: Any, tokens: list[str], types: Any, bos_id: Any, eos_id: Any) -> Tokenizer:
    """GGUF `llama` vocabularies (Llama 2, TinyLlama) are SentencePiece BPE models taken apart:
    rebuild the model proto from pieces, scores and types so sentencepiece itself tokenizes."""
    import sentencepiece

    scores = _gguf_get(reader, "tokenizer.ggml.scores")
    if scores is None or types is None:
        raise TokenizerError("GGUF 'llama' tokenizer needs tokenizer.ggml.scores and token_type")
    proto = sentencepiece_model_proto(
        tokens,
        scores,
        types,
        unk_id=_gguf_get(reader, "tokenizer.ggml.unknown_token_id", 0),
        bos_id=-1 if bos_id is None else bos_id,
        eos_id=-1 if eos_id is None else eos_id,
        add_dummy_prefix=bool(_gguf_get(reader, "tokenizer.ggml.add_space_prefix", True)),
        remove_extra_whitespaces=bool(_gguf_get(reader, "tokenizer.ggml.remove_extra_whitespaces", False)),
    )
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
        raise TokenizerError(f"GGUF SentencePiece vocabulary rejected by sentencepiece: {e}") from e
    return SentencePieceTokenizer(processor, "gguf-llama")


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 -> ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, value: int | float | bytes | str) -> bytes:
    """One protobuf field: varint (int/bool), fixed32 (float) or length-delimited (bytes/str)."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def sentencepiece_model_proto(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    unk_id: int,
    bos_id: int,
    eos_id: int,
    add_dummy_prefix: bool = True,
    remove_extra_whitespaces: bool = False,
) -> bytes:
    """A serialized sentencepiece ModelProto (BPE, identity normalizer) without the protobuf package.

    Field numbers are those of sentencepiece_model.proto: ModelProto{pieces=1, trainer_spec=2,
    normalizer_spec=3}, SentencePiece{piece=1, score=2, type=3}, TrainerSpec{model_type=3 (BPE=2),
    vocab_size=4, byte_fallback=35, unk_id=40, bos_id=41, eos_id=42, pad_id=43},
    NormalizerSpec{name=1, add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5}.
    """
    out = bytearray()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        out += _field(1, _field(1, piece) + _field(2, float(score)) + _field(3, int(kind)))
    trainer = _field(3, 2) + _field(4, len(pieces)) + _field(35, int(_BYTE in types))
    trainer += _field(40, unk_id) + _field(41, bos_id) + _field(42, eos_id) + _field(43, -1)
    normalizer = _field(1, "identity") + _field(3, int(add_dummy_prefix))
    normalizer += _field(4, int(remove_extra_whitespaces)) + _field(5, 1)
    return bytes(out + _field(2, trainer) + _field(3, normalizer))


# ---- HF tokenizer.json ---------------------------------------------------------------------------


def _hf_pattern(pre: dict[str, Any] | None) -> str:
    """The tiktoken pattern equal to an HF pre-tokenizer config; only shapes proven exact are accepted."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    unsupported = TokenizerError(f"unsupported pre-tokenizer {json.dumps(pre)[:300]}")
    if not kinds or kinds[-1] != "ByteLevel" or steps[-1].get("add_prefix_space"):
        raise unsupported
    uses_regex = steps[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and uses_regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and uses_regex and steps[0].get("individual_digits"):
        return SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"] and not uses_regex:
        split = steps[0]
        pattern = split.get("pattern", {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert") and pattern in (LLAMA3_PATTERN, QWEN2_PATTERN):
            return str(pattern)
    raise unsupported


def _hf_normalization(normalizer: dict[str, Any] | None) -> str | None:
    """None or NFC (Qwen2); other normalizers are refused rather than approximated."""
    if normalizer is None or (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        return None
    if normalizer.get("type") == "NFC":
        return "NFC"
    raise TokenizerError(f"unsupported normalizer {json.dumps(normalizer)[:200]}")


def _is_byte_level(data: dict[str, Any]) -> bool:
    """A tokenizer.json whose model is BPE over GPT-2 byte-level text (not SentencePiece-style ▁ BPE)."""
    decoder = data.get("decoder") or {}
    kinds = [d.get("type") for d in decoder.get("decoders", [])] if decoder.get("type") == "Sequence" else [decoder.get("type")]
    return data.get("model", {}).get("type") == "BPE" and "ByteLevel" in kinds


def _config_token(value: Any) -> str | None:
    """tokenizer_config.json names tokens as "text" or {"content": "text", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _hf_bpe(path: Path, data: dict[str, Any]) -> BPETokenizer:
    """Byte-level BPE from a parsed tokenizer.json (+ tokenizer_config.json / generation_config.json)."""
    model = data["model"]
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerError(f"tokenizer.json: BPE option {key}={model[key]!r} is not supported")
    if model.get("byte_fallback"):
        raise TokenizerError("tokenizer.json: byte_fallback BPE is SentencePiece-style, not byte-level")
    pattern = _hf_pattern(data.get("pre_tokenizer"))
    normalization = _hf_normalization(data.get("normalizer"))
    vocab: dict[str, int] = model["vocab"]
    added = data.get("added_tokens", [])
    size = 1 + max([*vocab.values(), *(a["id"] for a in added)])
    tokens, types = [""] * size, [_UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, _NORMAL
    for a in added:
        tokens[a["id"]], types[a["id"]] = a["content"], _CONTROL if a.get("special") else _USER_DEFINED
    ids = {t: i for i, t in enumerate(tokens) if types[i] != _UNUSED}
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    bos, eos = _config_token(config.get("bos_token")), _config_token(config.get("eos_token"))
    unk = model.get("unk_token")
    return bpe_from_vocab(
        name=path.name or "tokenizer.json",
        tokens=tokens,
        merges=[_split_merge(m) for m in model.get("merges", [])],
        pattern=pattern,
        types=types,
        normalization=normalization,
        bos_id=ids.get(bos) if bos else None,
        eos_id=ids.get(eos) if eos else None,
        unk_id=vocab.get(unk) if unk else None,
        fuse_unk=bool(model.get("fuse_unk")),
        extra_stop_ids=_generation_eos(path),
    )


def _generation_eos(path: Path) -> list[int]:
    """eos_token_id from generation_config.json (an id or a list: Llama 3 instruct stops on several)."""
    config_path = path / "generation_config.json"
    if not config_path.exists():
        return []
    eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token_id")
    return [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]


# ---- Llama 3 tokenizer.model (tiktoken ranks) ----------------------------------------------------

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/=]+ \d+\r?$")


def is_tiktoken_file(path: Path) -> bool:
    """Llama 3's tokenizer.model is text ("<base64 bytes> <rank>" lines); SentencePiece's is protobuf."""
    with open(path, "rb") as f:
        return bool(_TIKTOKEN_LINE.match(f.readline()))


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file without tiktoken.load (which caches copies in a temp dir)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}:{n}: not a tiktoken ranks line: {line[:60]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def llama3_tokenizer(path: Path) -> BPETokenizer:
    """Meta's Llama 3 tokenizer: tiktoken ranks file + its pattern + 256 specials after the ranks."""
    ranks = load_tiktoken_ranks(Path(path))
    base = len(ranks)
    specials = {text: base + i for i, text in enumerate(LLAMA3_SPECIAL_TOKENS)}
    id_bytes = [b""] * (base + len(specials))
    for token, rank in ranks.items():
        id_bytes[rank] = token
    eos = specials["<|end_of_text|>"]
    return BPETokenizer(
        name=Path(path).name,
        ranks=ranks,
        pattern=LLAMA3_PATTERN,
        id_bytes=id_bytes,
        special_tokens=specials,
        bos_id=specials["<|begin_of_text|>"],
        eos_id=eos,
        stop_ids=_stop_ids(eos, specials),
    )


# ---- SentencePiece -------------------------------------------------------------------------------


class SentencePieceTokenizer(_IdTable):
    """SentencePiece model (Llama 2, TinyLlama) via the sentencepiece package.

    token_bytes renders "▁" as a space and byte pieces "<0xAB>" as their byte, so streaming keeps the
    space in front of a word; decode() is sentencepiece's own, which drops the dummy-prefix space at
    the start of a text.
    """

    def __init__(self, processor: Any, name: str = "sentencepiece") -> None:
        self.name = name
        self._sp = processor
        sp = processor
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self.stop_ids = _stop_ids(self.eos_id, {})
        self._id_bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        self._split_special = _alternation(list(self.special_tokens))

    @classmethod
    def from_file(cls, path: Path) -> SentencePieceTokenizer:
        import sentencepiece

        try:
            processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model: {e}") from e
        return cls(processor, Path(path).name)

    def _piece_bytes(self, i: int) -> bytes:
        sp = self._sp
        if sp.is_control(i) or sp.is_unused(i):
            return b""
        if sp.is_unknown(i):
            return " \u2047 ".encode()  # what sentencepiece's decode prints for <unk>
        piece = sp.id_to_piece(i)
        byte = _byte_piece(piece) if sp.is_byte(i) else None
        return byte if byte is not None else piece.replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str, *, bos: bool = False, allow_special: bool = False) -> list[int]:
        text = _scrub(text)
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        if not allow_special or self._split_special is None:
            return ids + self._sp.encode(text)
        start = 0  # each plain segment is encoded on its own, like HF's slow Llama tokenizer
        for match in self._split_special.finditer(text):
            ids += self._sp.encode(text[start : match.start()]) if match.start() > start else []
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        return ids + (self._sp.encode(text[start:]) if start < len(text) else [])

    def decode(self, ids: Sequence[int]) -> str:
        self._check_ids(ids)
        return str(self._sp.decode(list(ids)))


# ---- entry point for a checkpoint directory ------------------------------------------------------


def tokenizer_from_dir(path: Path) -> Tokenizer:
    """The tokenizer of a checkpoint dir: byte-level HF tokenizer.json, else tokenizer.model
    (Llama 3 tiktoken ranks or SentencePiece)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    hf, model = path / "tokenizer.json", path / "tokenizer.model"
    if hf.exists():
        data = json.loads(hf.read_text(encoding="utf-8"))
        if _is_byte_level(data):
            return _hf_bpe(path, data)
        if not model.exists():
            raise TokenizerError(f"{hf}: only byte-level BPE tokenizer.json is supported (and no tokenizer.model)")
    if model.exists():
        return llama3_tokenizer(model) if is_tiktoken_file(model) else SentencePieceTokenizer.from_file(model)
    raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")
