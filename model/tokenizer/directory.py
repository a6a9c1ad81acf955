"""`tokenizer_from_dir(path)`: which tokenizer file of a checkpoint directory to load, and how.

A byte-level HF tokenizer.json wins; otherwise tokenizer.model, which is either Llama 3's tiktoken
ranks or a SentencePiece model.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.tokenizer.base import Tokenizer, TokenizerError
from model.tokenizer.hf_json import _hf_bpe, _is_byte_level
from model.tokenizer.llama3 import is_tiktoken_file, llama3_tokenizer
from model.tokenizer.spm import SentencePieceTokenizer


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
