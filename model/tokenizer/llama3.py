"""Meta's Llama 3 tokenizer.model: a tiktoken ranks file, Llama 3's pattern and 256 special tokens.

The file is text ("<base64 bytes> <rank>" lines), which is how `is_tiktoken_file` tells it from a
SentencePiece tokenizer.model (protobuf) of the same name.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from model.tokenizer.base import TokenizerError
from model.tokenizer.bpe import LLAMA3_PATTERN, BPETokenizer
from model.tokenizer.common import _stop_ids

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
