"""Request bodies of the OpenAI wire format (and vLLM's extras), validated where they are parsed.

This is the validation boundary for shapes, types and OpenAI's ranges: a failure becomes a 400 in the
error envelope (app/errors.py). What needs the vocabulary or the context length is the engine's check
(app/engine/request.check_request). Unknown fields are ignored, as vLLM does, so vendor-specific
clients keep working.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from app.engine.request import MIN_TOKENS_ABOVE_MAX
from app.protocol.structured import ResponseFormat, StructuredError, StructuredOutputs, grammar_of
from app.quoting import excerpt
from model.tool_calls import Tool

TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # a logit_bias key: ASCII digits only, well inside int range
# OpenAI allows 4; vLLM has no limit, and lm-eval appends the EOS text to a task's own stop list.
MAX_STOP_STRINGS = 16


def _integral(value: Any) -> Any:
    """2.0 -> 2: JSON Schema counts an integral number as an integer (clients computing a float send it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A count/seed field: integers and integral floats only. A bounded one puts its bounds before the validator,
# Annotated[int, Field(ge=1), INTEGRAL]: with `Int | None = Field(1, ge=1)` (same validation, same messages)
# pydantic cannot carry the bounds through the validator into the JSON Schema and served a raw `"ge": 1` (no
# such keyword) in /openapi.json, so clients and schemathesis saw no bounds (tests/test_api_fuzz.py).
INTEGRAL = BeforeValidator(_integral)
Int = Annotated[int, INTEGRAL]


class FieldError(ValueError):
    """A check across fields that still blames one parameter (the error envelope's `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class _Request(BaseModel):
    """Strict JSON types, as OpenAI checks them: "10" is not an integer, 1 is not a boolean (an int is a float)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = False


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then the self-hosted extras)."""

    model: StrictStr
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: Annotated[int, Field(ge=1, le=128), INTEGRAL] | None = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: Int | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # self-hosted extras (vLLM names)
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1), INTEGRAL] | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool | None = False
    min_tokens: Annotated[int, Field(ge=0), INTEGRAL] | None = 0
    # structured outputs (app/protocol/structured.py): OpenAI's response_format, then vLLM's names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not TOKEN_ID_KEY.fullmatch(key):  # str.isdigit() accepts "²" and "٣", int() accepts " 5 "
                raise ValueError(f"logit_bias keys must be token ids written as plain decimal digits, got {excerpt(key)}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return value

    @model_validator(mode="after")
    def _check_stream_options(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options is only allowed when stream is true", "stream_options")
        try:
            grammar_of(self)  # the shape of the constraint; compiling it is the route's job (a worker thread)
        except StructuredError as e:
            raise FieldError(str(e), e.param) from None
        return self

    def token_bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


PromptType = Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    max_tokens: Annotated[int, Field(ge=0), INTEGRAL] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5), INTEGRAL] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _check_prompt(cls, value: Any, handler: Any) -> Any:
        """One clear message instead of pydantic's per-union-member errors."""
        try:
            return handler(value)
        except ValueError:
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
            ) from None

    @model_validator(mode="after")
    def _check_completion(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of not in (1, self.n or 1):
            raise FieldError("best_of is only supported when it equals n (or 1)", "best_of")
        if self.suffix:
            raise FieldError("suffix is not supported", "suffix")
        if (self.min_tokens or 0) > self.max_tokens_or_default():
            raise FieldError(MIN_TOKENS_ABOVE_MAX, "min_tokens")
        return self

    def max_tokens_or_default(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of strings or token-id lists (one entry per prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [[p for p in prompt if isinstance(p, int)]]
        return [p for p in prompt if isinstance(p, (str, list))]


FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


class FunctionCallIn(_Request):
    name: StrictStr
    arguments: StrictStr = "{}"


class ToolCallIn(_Request):
    """An earlier assistant turn's tool call, as the client sends the history back."""

    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class FunctionDefinition(_Request):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not FUNCTION_NAME.fullmatch(value):
            raise ValueError(f"function names are 1-64 letters, digits, underscores or dashes, got {excerpt(value)}")
        return value


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: StrictStr


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class ChatMessage(_Request):
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn that called tools
    tool_call_id: StrictStr | None = None  # a tool result: the call it answers

    def text(self, index: int) -> str:
        """Content as one string; text parts are concatenated, anything else is an error."""
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise ValueError(f"messages[{index}].content is required")
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"messages[{index}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported"
                )
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None  # OpenAI, vLLM: >= 1 (0 is a legacy-completions thing)
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20), INTEGRAL] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs requires logprobs to be true", "top_logprobs")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise FieldError("tools must have distinct function names", "tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            listed = ", ".join(names) or "none were given"
            raise FieldError(
                f"tool_choice names the function {excerpt(self.tool_choice.function.name)}, which is not in tools ({listed})",
                "tool_choice",
            )
        if self.tool_choice == "required" and not names:
            raise FieldError("tool_choice 'required' needs at least one tool in tools", "tool_choice")
        limit = self.requested_max_tokens()
        if limit is not None and (self.min_tokens or 0) > limit:
            raise FieldError(MIN_TOKENS_ABOVE_MAX, "min_tokens")
        return self

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (new name) wins over max_tokens; None = up to the context limit."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def active_tools(self) -> list[Tool]:
        """The tools the model may call: none with tool_choice "none" (they are then not even shown to it)."""
        if self.tool_choice == "none":
            return []
        return [
            Tool(t.function.name, t.function.description, t.function.parameters or {"type": "object", "properties": {}})
            for t in self.tools or []
        ]

    def forced_tools(self) -> list[Tool] | None:
        """The tools one of which must be called (tool_choice "required" or a named function), else None."""
        tools = self.active_tools()
        if self.tool_choice == "required":
            return tools
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in tools if t.name == self.tool_choice.function.name]
        return None


class TokenizeRequest(_Request):
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: bool = False


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: list[StrictInt]
