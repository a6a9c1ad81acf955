"""The tokenizer stored in a GGUF file's metadata: `tokenizer_from_gguf(reader)`.

`gpt2` vocabularies become a `BPETokenizer` (with the pattern llama.cpp's `tokenizer.ggml.pre` names),
`llama` ones a `SentencePieceTokenizer` over a rebuilt model proto. Only the reader's
`fields.get(key)` / `.contents()` are used, so the checkpoint loader's cached stand-in works too.
"""

from __future__ import annotations

from typing import Any

from model.tokenizer.base import Tokenizer, TokenizerError
from model.tokenizer.bpe import (
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    SMOLLM_PATTERN,
    BPETokenizer,
    UnicodeForm,
    _split_merge,
    bpe_from_vocab,
)
from model.tokenizer.protobuf import sentencepiece_model_proto
from model.tokenizer.spm import SentencePieceTokenizer

# llama.cpp `tokenizer.ggml.pre` -> (pattern, unicode normalization of the original HF tokenizer).
# NFC is Python's (Unicode 14); HF's Rust tables are older, so text with combining marks added since
# (e.g. U+07FD) can be ordered differently: 3 in 20,000 random-codepoint strings, 0 in realistic text.
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, UnicodeForm | None]] = {
    "gpt2": (GPT2_PATTERN, None),
    "smollm": (SMOLLM_PATTERN, None),
    "llama-bpe": (LLAMA3_PATTERN, None),
    "qwen2": (QWEN2_PATTERN, "NFC"),
}


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
    tokenizer = _tokenizer_of_kind(reader, kind, tokens, types, bos_id, eos_id)
    pad_id = _gguf_get(reader, "tokenizer.ggml.padding_token_id")
    if isinstance(pad_id, int) and 0 <= pad_id < tokenizer.vocab_size:
        tokenizer.pad_id = pad_id
    return tokenizer


def _tokenizer_of_kind(
    reader: Any, kind: str, tokens: list[str], types: Any, bos_id: Any, eos_id: Any
) -> BPETokenizer | SentencePieceTokenizer:
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


def _sentencepiece_from_gguf(reader: Any, tokens: list[str], types: Any, bos_id: Any, eos_id: Any) -> SentencePieceTokenizer:
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
