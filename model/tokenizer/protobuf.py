"""A minimal protobuf writer for sentencepiece's ModelProto.

GGUF stores a SentencePiece vocabulary as pieces, scores and types; sentencepiece only loads a
serialized ModelProto. Writing the few fields it needs by hand avoids depending on `protobuf`.
"""

from __future__ import annotations

import struct
from typing import Sequence

from model.tokenizer.common import _BYTE


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
