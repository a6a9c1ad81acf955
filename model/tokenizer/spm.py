"""`SentencePieceTokenizer`: SentencePiece models (Llama 2, TinyLlama) on the sentencepiece package.

Named `spm` rather than `sentencepiece` so that the module is not confused with the package it
wraps. The model comes from a tokenizer.model file or, for GGUF `llama` vocabularies, from a model
proto rebuilt by gguf_vocab.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from model.tokenizer.base import TokenizerError
from model.tokenizer.common import _alternation, _byte_piece, _IdTable, _scrub, _stop_ids


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
