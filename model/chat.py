"""Chat formats rendered at the token level (no Jinja): ChatML, Llama 3 headers, Llama 2 [INST].

Control tokens come only from the format: message text is always encoded with allow_special=False, so
a user typing "<|im_end|>" gets plain text, never a turn boundary. The format is detected from the
checkpoint's chat template (or, without one, from the tokenizer's control tokens).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from model.tokenizer import Tokenizer

CHAT_FORMATS = ("chatml", "llama3", "llama2")
# "developer" is OpenAI's newer name for system; "function" the deprecated name for a tool result
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ChatFormatError(ValueError):
    """Messages this format cannot render (unknown role, bad order, missing control token)."""


def detect_chat_format(chat_template: str | None, tokenizer: Tokenizer) -> str:
    """The format named by the template's control tokens, else by the tokenizer's; Llama 2 as fallback.

    Llama 2's [INST] markers are plain text, so it renders with any tokenizer.
    """
    markers = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "llama2"))
    for marker, name in markers:
        if chat_template and marker in chat_template:
            return name
    specials = tokenizer.special_tokens
    if "<|im_start|>" in specials and "<|im_end|>" in specials:
        return "chatml"
    if "<|start_header_id|>" in specials and "<|eot_id|>" in specials:
        return "llama3"
    return "llama2"


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when the messages have none (SmolLM2, Qwen2)."""
    if not chat_template:
        return None
    match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat_template, re.DOTALL)
    return match.group(1) if match else None


def end_of_turn_ids(fmt: str, tokenizer: Tokenizer) -> set[int]:
    """Ids that end an assistant turn in this format (added to a chat request's stop ids)."""
    text = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama2": "</s>"}[_check_format(fmt)]
    ids = {tokenizer.special_tokens[text]} if text in tokenizer.special_tokens else set()
    return ids | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())


def render_chat(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    fmt: str,
    *,
    default_system: str | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Prompt ids for messages ({"role", "content"} with str content), ready for the assistant's reply."""
    if not messages:
        raise ChatFormatError("messages must not be empty")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise ChatFormatError(f"messages[{i}].role {message.get('role')!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatFormatError(f"messages[{i}].content must be text")
    msgs = [(_canonical_role(m["role"]), m["content"]) for m in messages]
    render = {"chatml": _render_chatml, "llama3": _render_llama3, "llama2": _render_llama2}[_check_format(fmt)]
    return render(msgs, tokenizer, default_system, add_generation_prompt)


def _check_format(fmt: str) -> str:
    if fmt not in CHAT_FORMATS:
        raise ChatFormatError(f"unknown chat format {fmt!r}; expected one of {', '.join(CHAT_FORMATS)}")
    return fmt


def _canonical_role(role: str) -> str:
    return {"developer": "system", "function": "tool"}.get(role, role)


def _special(tokenizer: Tokenizer, text: str) -> int:
    if text not in tokenizer.special_tokens:
        raise ChatFormatError(f"the tokenizer has no {text} token, which this chat format needs")
    return tokenizer.special_tokens[text]


def _render_chatml(
    msgs: list[tuple[str, str]], tokenizer: Tokenizer, default_system: str | None, add_generation_prompt: bool
) -> list[int]:
    """<|im_start|>{role}\\n{content}<|im_end|>\\n per message, then <|im_start|>assistant\\n."""
    start, end = _special(tokenizer, "<|im_start|>"), _special(tokenizer, "<|im_end|>")
    if default_system is not None and msgs[0][0] != "system":
        msgs = [("system", default_system), *msgs]
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    for role, content in msgs:
        ids += [start, *tokenizer.encode(f"{role}\n{content}"), end, *newline]
    if add_generation_prompt:
        ids += [start, *tokenizer.encode("assistant\n")]
    return ids


def _render_llama3(
    msgs: list[tuple[str, str]], tokenizer: Tokenizer, default_system: str | None, add_generation_prompt: bool
) -> list[int]:
    """<|begin_of_text|> then <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> (Meta's format)."""
    begin, eot = _special(tokenizer, "<|begin_of_text|>"), _special(tokenizer, "<|eot_id|>")
    head, head_end = _special(tokenizer, "<|start_header_id|>"), _special(tokenizer, "<|end_header_id|>")
    if default_system is not None and msgs[0][0] != "system":
        msgs = [("system", default_system), *msgs]
    ids = [begin]
    for role, content in msgs:
        role = "ipython" if role == "tool" else role  # Llama 3.1+'s header for tool results
        ids += [head, *tokenizer.encode(role), head_end, *tokenizer.encode("\n\n" + content.strip()), eot]
    if add_generation_prompt:
        ids += [head, *tokenizer.encode("assistant"), head_end, *tokenizer.encode("\n\n")]
    return ids


def _render_llama2(
    msgs: list[tuple[str, str]], tokenizer: Tokenizer, default_system: str | None, add_generation_prompt: bool
) -> list[int]:
    """Meta's Llama 2 format: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>...

    The system prompt is folded into the first user turn; turns must alternate user/assistant.
    """
    system = default_system
    if msgs[0][0] == "system":
        system, msgs = msgs[0][1], msgs[1:]
    for i, (role, _) in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ChatFormatError(
                f"this model's chat format (llama2) needs an optional system message first, then alternating "
                f"user/assistant messages starting with user; message {i} is {role!r}"
            )
    if not msgs:
        raise ChatFormatError("this model's chat format (llama2) needs at least one user message")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids: list[int] = []
    for i in range(0, len(msgs), 2):
        user = msgs[i][1]
        if i == 0 and system is not None:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        user = user.strip()
        if i + 1 < len(msgs):
            ids += bos + tokenizer.encode(f"[INST] {user} [/INST] {msgs[i + 1][1].strip()} ") + eos
        else:
            ids += bos + tokenizer.encode(f"[INST] {user} [/INST]")
    return ids
