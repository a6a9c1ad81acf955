"""Tokenizers: one small interface, several implementations, and a streaming detokenizer.

Every tokenizer maps text to ids and ids to raw bytes. Decoding is bytes-first so that streaming can
hold back an incomplete UTF-8 character instead of emitting U+FFFD.

Implementations: `ByteTokenizer` (tests), `BPETokenizer` (byte-level BPE on tiktoken: Llama 3
tokenizer.model, GGUF `gpt2` vocabularies, HF tokenizer.json) and `SentencePieceTokenizer` (Llama 2,
TinyLlama; also GGUF `llama` vocabularies). Entry points for the checkpoint loader:
`tokenizer_from_gguf(reader)` and `tokenizer_from_dir(path)`; both raise `TokenizerError` (a
ValueError) for anything they cannot tokenize exactly.

Modules: `base` (the `Tokenizer` protocol, `ByteTokenizer`, `TokenizerError`), `detokenizer`
(`IncrementalDetokenizer`), `common` (what the real implementations share), `bpe` (the BPE engine
and its pre-tokenizer patterns), `spm` (SentencePiece), `protobuf` (a ModelProto writer for GGUF
SentencePiece vocabularies), and one module per file format: `gguf_vocab`, `hf_json` (tokenizer.json),
`llama3` (Meta's tiktoken tokenizer.model), `directory` (which file of a checkpoint dir to load).
This package re-exports the names the rest of the code base imports.
"""

from model.tokenizer.base import ByteTokenizer, Tokenizer, TokenizerError
from model.tokenizer.bpe import BPETokenizer
from model.tokenizer.detokenizer import IncrementalDetokenizer
from model.tokenizer.directory import tokenizer_from_dir
from model.tokenizer.gguf_vocab import tokenizer_from_gguf
from model.tokenizer.spm import SentencePieceTokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "IncrementalDetokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "tokenizer_from_dir",
    "tokenizer_from_gguf",
]
