"""HF tokenizer.json (+ tokenizer_config.json, generation_config.json) -> byte-level `BPETokenizer`.

Only configurations proven exact against HF `tokenizers` are accepted (ByteLevel pre-tokenizers
with the known patterns, no normalizer or NFC); anything else is a `TokenizerError`, never an
approximation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.tokenizer.base import TokenizerError
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
from model.tokenizer.common import _CONTROL, _NORMAL, _UNUSED, _USER_DEFINED


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


def _hf_normalization(normalizer: dict[str, Any] | None) -> UnicodeForm | None:
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
    unk, pad = model.get("unk_token"), _config_token(config.get("pad_token"))
    tokenizer = bpe_from_vocab(
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
    tokenizer.pad_id = ids.get(pad) if pad else None
    return tokenizer


def _generation_eos(path: Path) -> list[int]:
    """eos_token_id from generation_config.json (an id or a list: Llama 3 instruct stops on several)."""
    config_path = path / "generation_config.json"
    if not config_path.exists():
        return []
    eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token_id")
    return [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
