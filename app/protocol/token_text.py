"""Token ids as clients see them written: control tokens by name, other tokens as their UTF-8 text."""

from __future__ import annotations

from model.tokenizer import Tokenizer


class TokenTexts:
    """Token id -> the string clients see: control tokens by name, split UTF-8 as `bytes:\\xNN` (OpenAI's form)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.specials = {i: text for text, i in tokenizer.special_tokens.items()}

    def raw(self, token_id: int) -> bytes:
        special = self.specials.get(token_id)
        return special.encode() if special is not None else self.tokenizer.token_bytes(token_id)

    def text(self, token_id: int) -> str:
        raw = self.raw(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_text(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    """The text of one token as clients name it: a control token's name, else its bytes as UTF-8 (None if not text)."""
    if token_id is None or not 0 <= token_id < tokenizer.vocab_size:
        return None
    for text, i in tokenizer.special_tokens.items():
        if i == token_id:
            return text
    try:
        return tokenizer.token_bytes(token_id).decode("utf-8") or None
    except UnicodeDecodeError:
        return None


def spelled_out(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Text of a token-id prompt for echo: control tokens by name (as a text prompt writes them), the rest decoded."""
    names = {i: text for text, i in tokenizer.special_tokens.items()}
    parts: list[str] = []
    run: list[int] = []
    for token_id in ids:
        if token_id in names:
            parts += [tokenizer.decode(run), names[token_id]]
            run = []
        else:
            run.append(token_id)
    return "".join(parts) + tokenizer.decode(run)
