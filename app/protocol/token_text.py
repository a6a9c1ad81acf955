"""Token ids as clients see them written: as generated text has them (control tokens add nothing) or as a prompt
spells them (control tokens by name)."""

from __future__ import annotations

from model.tokenizer import Tokenizer


class TokenTexts:
    """Token id -> the string clients see for it in logprobs.

    Generated text never holds a control token (the detokenizer drops it), so `emitted` gives one ""
    and the logprob tokens of a generation join to its text; `named` writes it by name, as an echoed
    prompt that spells it out does. Bytes that are not UTF-8 on their own (a character split across
    tokens) read `bytes:\\xNN`, OpenAI's form.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.specials = {i: text for text, i in tokenizer.special_tokens.items()}

    def emitted_bytes(self, token_id: int) -> bytes:
        """The bytes the token adds to generated text: the detokenizer's, b"" for a control token."""
        return self.tokenizer.token_bytes(token_id)

    def emitted(self, token_id: int) -> str:
        """The token as generated text has it: a control token is ""."""
        return readable(self.emitted_bytes(token_id))

    def named(self, token_id: int) -> str:
        """The token as a prompt writes it: a control token by its name."""
        name = self.specials.get(token_id)
        return name if name is not None else self.emitted(token_id)


def readable(raw: bytes) -> str:
    """Bytes as UTF-8 text, or as `bytes:\\xNN...` where they are not (OpenAI's form)."""
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
