"""Tool calling in the model's own words: tools into the prompt, calls out of the text, forced-call grammars.

Two styles, chosen by chat format:
- "hermes" (ChatML: Qwen2.5, and the documented default for ChatML/Llama 2 templates without tools such
  as SmolLM2's): the tool list goes into the system message inside <tools></tools>, each call comes
  back as <tool_call>{"name": ..., "arguments": {...}}</tool_call>, tool results go back as a user turn
  of <tool_response> blocks. This is Qwen2.5's chat template, word for word.
- "llama3_json" (Llama 3.1+): the tool list and instructions open the first user message, a call is
  one JSON object {"name": ..., "parameters": {...}}, tool results use the ipython role (model/chat.py).

`prepare_messages` rewrites an OpenAI message list (tools, assistant tool_calls, tool results) into
plain role/content messages for model/chat.render_chat. `forced_call_grammar` is the grammar for
tool_choice "required" or a named function: the call's arguments follow the function's parameter
schema, so they always parse. `ToolCallParser` splits generated text into content and calls, token
by token when streaming.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from model.grammar import json_lark

ToolStyle = Literal["hermes", "llama3_json"]
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
HERMES_INSTRUCTIONS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
LLAMA3_INSTRUCTIONS = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
    "Do not use variables.\n\n"
)
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: dict(ANY_OBJECT))

    def openai(self) -> dict[str, Any]:
        """The tool as OpenAI's request spells it (what the hermes prompt lists)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


def tool_style(chat_format: str) -> ToolStyle:
    return "llama3_json" if chat_format == "llama3" else "hermes"


def _arguments_json(arguments: str) -> str:
    """OpenAI history carries arguments as JSON text; templates embed the object (text that is not JSON stays a string)."""
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except (json.JSONDecodeError, TypeError):
        return json.dumps(arguments, ensure_ascii=False)


def prepare_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool], style: ToolStyle, default_system: str | None
) -> tuple[list[dict[str, str]], str | None]:
    """Messages with tools, tool calls and tool results written out as text, and the default system prompt
    still to apply (None once the tool list has put a system message in).

    Each message has "role", "content" (str) and optionally "tool_calls" ([{"name", "arguments"}]).
    """
    out: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], message["content"]
        calls = message.get("tool_calls") or []
        if role == "assistant" and calls:
            content = _written_calls(content, calls, style)
        if style == "hermes" and role in ("tool", "function"):
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + response
                continue
            out.append({"role": "user", "content": response, "_tool_results": "1"})
            continue
        out.append({"role": role, "content": content})
    for message in out:
        message.pop("_tool_results", None)
    if not tools:
        return out, default_system
    if style == "hermes":
        listed = "".join("\n" + json.dumps(t.openai(), ensure_ascii=False) for t in tools)
        instructions = HERMES_INSTRUCTIONS.format(tools=listed)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": "system", "content": out[0]["content"] + instructions}
        else:
            out.insert(0, {"role": "system", "content": (default_system or "") + instructions})
        return out, None
    listed = "".join(json.dumps(t.openai(), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    first_user = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
    if first_user is None:
        out.append({"role": "user", "content": LLAMA3_INSTRUCTIONS + listed.rstrip("\n")})
    else:
        out[first_user] = {"role": "user", "content": LLAMA3_INSTRUCTIONS + listed + out[first_user]["content"]}
    return out, default_system


def _written_calls(content: str, calls: Sequence[Mapping[str, str]], style: ToolStyle) -> str:
    if style == "hermes":
        blocks = [
            f'{HERMES_OPEN}\n{{"name": {json.dumps(c["name"], ensure_ascii=False)}, "arguments": '
            f"{_arguments_json(c['arguments'])}}}\n{HERMES_CLOSE}"
            for c in calls
        ]
        return "\n".join(([content] if content else []) + blocks)
    objects = [
        f'{{"name": {json.dumps(c["name"], ensure_ascii=False)}, "parameters": {_arguments_json(c["arguments"])}}}' for c in calls
    ]
    return "; ".join(objects)


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The arguments object without undeclared keys unless the schema asks for them (llama.cpp's default
    too): a model given the freedom invents keys, a small one rambles in them until max_tokens."""
    if schema.get("type") == "object" and "additionalProperties" not in schema and "properties" in schema:
        return {**schema, "additionalProperties": False}
    return schema


def _call_schema(tool: Tool, arguments_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: _closed(tool.parameters)},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def forced_call_grammar(tools: Sequence[Tool], style: ToolStyle, parallel: bool) -> str:
    """Lark text whose every sentence is one call (or, with `parallel`, one or more) of one of `tools`."""
    if not tools:
        raise ValueError("a forced tool call needs at least one tool")
    key = "arguments" if style == "hermes" else "parameters"
    schema = {"anyOf": [_call_schema(t, key) for t in tools]} if len(tools) > 1 else _call_schema(tools[0], key)
    if style == "hermes":
        repeat = ' ("\\n" call)*' if parallel else ""
        return f'start: call{repeat}\ncall: "{HERMES_OPEN}\\n" {json_lark(schema)} "\\n{HERMES_CLOSE}"\n'
    repeat = ' ("; " call)*' if parallel else ""
    return f"start: call{repeat}\ncall: {json_lark(schema)}\n"


@dataclass
class ParsedEvent:
    """A piece of generated text: content to show, or a complete tool call."""

    content: str = ""
    call: ToolCall | None = None


class ToolCallParser:
    """Splits generated text into content and tool calls as it arrives (feed), then at the end (finish).

    Text that might still become a call is held back: in hermes style a partial "<tool_call>" tag and
    everything inside a block until its "</tool_call>"; in llama3_json style a reply whose first
    non-blank character is "{" (it is a call if the whole reply parses as one). A block that does not
    parse as a call of a known tool is content after all, so nothing the model wrote is lost.
    """

    def __init__(self, tools: Sequence[Tool], style: ToolStyle) -> None:
        self.names = {t.name for t in tools}
        self.style = style
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._inside = False  # hermes: between <tool_call> and </tool_call>
        self._started = False  # llama3_json: the first non-blank character has been seen
        self._json_reply = False  # llama3_json: it was "{"

    def feed(self, text: str) -> list[ParsedEvent]:
        self._buffer += text
        if self.style == "llama3_json":
            return self._feed_llama3()
        events: list[ParsedEvent] = []
        while True:
            if self._inside:
                end = self._buffer.find(HERMES_CLOSE)
                if end < 0:
                    return events
                block, self._buffer = self._buffer[:end], self._buffer[end + len(HERMES_CLOSE) :]
                self._inside = False
                events.append(self._hermes_block(block))
                continue
            start = self._buffer.find(HERMES_OPEN)
            if start >= 0:
                before, self._buffer = self._buffer[:start], self._buffer[start + len(HERMES_OPEN) :]
                self._inside = True
                events += self._content(before)
                continue
            keep = _partial_suffix(self._buffer, HERMES_OPEN)
            ready, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
            return events + self._content(ready)

    def finish(self) -> list[ParsedEvent]:
        """The end of the text: what was held back, as a call if it is one, else as content."""
        rest, self._buffer = self._buffer, ""
        if self.style == "llama3_json":
            if self._json_reply:
                calls = self._llama3_calls(rest)
                if calls is not None:
                    self.calls += calls
                    return [ParsedEvent(call=c) for c in calls]
            return self._content(rest)
        if self._inside:
            self._inside = False
            return self._content(HERMES_OPEN + rest)
        return self._content(rest)

    def _content(self, text: str) -> list[ParsedEvent]:
        if not text or (self.calls and not text.strip()):  # the newlines between calls are not content
            return []
        return [ParsedEvent(content=text)]

    def _hermes_block(self, block: str) -> ParsedEvent:
        call = self._call_of(block.strip(), "arguments")
        if call is None:
            return ParsedEvent(content=HERMES_OPEN + block + HERMES_CLOSE)
        self.calls.append(call)
        return ParsedEvent(call=call)

    def _call_of(self, text: str, key: str) -> ToolCall | None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get(key, value.get("arguments", value.get("parameters", {})))
        if not isinstance(arguments, dict):
            return None
        return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))

    def _feed_llama3(self) -> list[ParsedEvent]:
        if not self._started:
            stripped = self._buffer.lstrip()
            if not stripped:
                return []
            self._started = True
            self._json_reply = stripped.startswith("{")
        if self._json_reply:
            return []
        text, self._buffer = self._buffer, ""
        return self._content(text)

    def _llama3_calls(self, text: str) -> list[ToolCall] | None:
        calls = []
        for part in _split_top_level(text.strip(), ";"):
            call = self._call_of(part.strip(), "parameters")
            if call is None:
                return None
            calls.append(call)
        return calls or None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (held back in case the tag follows)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _split_top_level(text: str, separator: str) -> list[str]:
    """`text` split at `separator` outside JSON strings and brackets ({...}; {...} -> two parts)."""
    parts, depth, in_string, escaped, start = [], 0, False, False, 0
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts
