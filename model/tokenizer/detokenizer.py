"""Streaming detokenization: ids in, only complete characters out.

A character whose UTF-8 bytes are split across tokens must not reach a client as U+FFFD, so the
engine and the HTTP layer turn each generated id into text through `IncrementalDetokenizer`.
"""

from __future__ import annotations

import codecs

from model.tokenizer.base import Tokenizer


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
