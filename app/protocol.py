"""Pydantic models of the OpenAI wire format: requests (validated) and responses/chunks (serialised).

Request validation here covers everything that needs no tokenizer; a failure becomes a 400 in the error
envelope (app/errors.py). Checks that need the vocabulary or the context length happen in the server and
the engine. Unknown request fields are ignored, as vLLM does, so vendor-specific clients keep working.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from app.errors import excerpt
from model.tokenizer import IncrementalDetokenizer, Tokenizer

TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # a logit_bias key: ASCII digits only, well inside int range
# OpenAI allows 4; vLLM has no limit, and lm-eval appends the EOS text to a task's own stop list.
MAX_STOP_STRINGS = 16
LOGPROB_FLOOR = -9999.0  # what JSON gets instead of -inf (vLLM's choice; the engine clamps there too)


def _integral(value: Any) -> Any:
    """2.0 -> 2: JSON Schema counts an integral number as an integer (clients computing a float send it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]  # a count/seed field: integers and integral floats only


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
    n: Int | None = Field(1, ge=1, le=128)
    stop: StrictStr | list[StrictStr] | None = None
    seed: Int | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # self-hosted extras (vLLM names)
    top_k: Int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool | None = False
    min_tokens: Int | None = Field(0, ge=0)

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
        return self

    def token_bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


PromptType = Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    max_tokens: Int | None = Field(16, ge=0)
    logprobs: Int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: Int | None = Field(None, ge=1)
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
            raise FieldError("min_tokens must not exceed max_tokens", "min_tokens")
        return self

    def max_tokens_or_default(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of strings or token-id lists (one entry per prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class ChatMessage(_Request):
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None
    name: str | None = None

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


class ResponseFormat(_Request):
    type: str = "text"


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)  # OpenAI and vLLM: at least 1 (0 is a legacy-completions thing)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise FieldError(f"response_format {self.response_format.type!r} is not supported (only 'text')", "response_format")
        if self.tool_choice not in (None, "none", "auto"):
            raise FieldError("tool_choice 'required' or a named tool is not supported (this server makes no tool calls)",
                             "tool_choice")
        if self.tools and self.tool_choice != "none":  # with "none" the tools are only context; we ignore them
            raise FieldError("tools are not supported by this server (send tool_choice 'none' to ignore them)", "tools")
        limit = self.requested_max_tokens()
        if limit is not None and (self.min_tokens or 0) > limit:
            raise FieldError("min_tokens must not exceed max_tokens", "min_tokens")
        return self

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (new name) wins over max_tokens; None = up to the context limit."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ------------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------------


def new_id(prefix: str, suffix: str | None = None) -> str:
    """A response id: `prefix-` + the given suffix (a client's request id) or a random hex uuid."""
    return f"{prefix}-{suffix or uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.total_tokens = self.prompt_tokens + self.completion_tokens


class CompletionLogprobs(BaseModel):
    """The legacy per-choice logprobs object; entries are None for the first echoed prompt token."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: list[TokenLogprobEntry] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": "assistant", "content": ""} first, then {"content": ...}, {} last
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llamaserve"
    max_model_len: int
    quantization: str = Field("none", description="the weights' numeric path: none (the checkpoint's dtype) or int4")
    batch_invariant: bool = Field(
        False, description="a request's tokens and logprobs do not depend on what else shares its batch (--batch-invariant)"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Request):
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: bool = False


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """GET /tokenizer_info: vLLM's answer (tokenizer_config-style fields), as lm-evaluation-harness's
    RemoteTokenizer reads it: eos/bos/pad_token as token text (it turns them into ids with POST /tokenize)
    and chat_template (a Jinja template it renders itself). null where the model has no such token."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool  # whether text prompts of /v1/completions (and /tokenize with add_special_tokens) get BOS
    model_max_length: int  # the served context (prompt + completion tokens)
    vocab_size: int
    chat_template: str | None


# ------------------------------------------------------------------------------------------------
# Logprobs in the two wire shapes
# ------------------------------------------------------------------------------------------------


def safe_logprob(value: float) -> float:
    """JSON has no -inf or NaN: clamp as vLLM does."""
    return value if math.isfinite(value) else LOGPROB_FLOOR


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


class LegacyLogprobs:
    """Builds legacy completion logprobs chunk by chunk, keeping text_offset running across chunks.

    text_offset is the character offset of each token in the returned text (with echo, from the start
    of the prompt), counted on complete characters as the detokenizer emits them.
    """

    def __init__(self, tokenizer: Tokenizer, offset: int = 0) -> None:
        self.names = TokenTexts(tokenizer)
        self.tokenizer = tokenizer
        self.offset = offset
        self._detok = IncrementalDetokenizer(tokenizer)

    def prompt(self, prompt_ids: list[int], entries: list[Any] | None, echo_text: str) -> CompletionLogprobs:
        """The echoed prompt's logprobs (entry 0 and any missing entry null); offsets restart after it.

        A control token the detokenizer drops still spans its name when the echoed text spells it out
        (a text prompt with "<|im_start|>" in it); an added BOS spans nothing.
        """
        out = CompletionLogprobs()
        detok, offset = IncrementalDetokenizer(self.tokenizer), 0
        entries = entries or []
        for k, token_id in enumerate(prompt_ids):
            entry = entries[k] if k < len(entries) else None
            self._append(out, token_id, entry, offset)
            piece, name = detok.push(token_id), self.names.specials.get(token_id)
            offset += len(name) if not piece and name and echo_text.startswith(name, offset) else len(piece)
        self.offset = len(echo_text)
        return out

    def take(self, entries: list[Any]) -> CompletionLogprobs:
        """Logprobs of newly generated tokens (engine TokenLogprob objects)."""
        out = CompletionLogprobs()
        for entry in entries:
            self._append(out, entry.token_id, entry, self.offset)
            self.offset += len(self._detok.push(entry.token_id))
        return out

    def _append(self, out: CompletionLogprobs, token_id: int, entry: Any, offset: int) -> None:
        out.tokens.append(self.names.text(token_id))
        out.text_offset.append(offset)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            return
        chosen = safe_logprob(entry.logprob)
        top = {self.names.text(t): safe_logprob(lp) for t, lp in entry.top}
        top.setdefault(self.names.text(token_id), chosen)  # the chosen token is always listed
        out.token_logprobs.append(chosen)
        out.top_logprobs.append(top)


def merge_logprobs(*parts: CompletionLogprobs) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for part in parts:
        out.tokens += part.tokens
        out.token_logprobs += part.token_logprobs
        out.top_logprobs += part.top_logprobs
        out.text_offset += part.text_offset
    return out


def chat_logprobs(tokenizer: Tokenizer, entries: list[Any], top_n: int) -> list[TokenLogprobEntry]:
    """Chat-shaped logprobs: token, logprob, bytes, and the top_n alternatives."""
    names = TokenTexts(tokenizer)

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": names.text(token_id), "logprob": safe_logprob(logprob), "bytes": list(names.raw(token_id))}

    return [
        TokenLogprobEntry(
            **item(e.token_id, e.logprob), top_logprobs=[TopLogprob(**item(t, lp)) for t, lp in e.top[:top_n]]
        )
        for e in entries
    ]
