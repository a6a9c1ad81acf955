"""One request's life in the engine: what a client asks for, the state the engine keeps, what it sends back.

A request moves WAITING -> PREFILLING -> DECODING -> FINISHED (or CANCELLED / FAILED from any state).
The scheduler moves it into and out of slots, the model runner fills its KV slot (`num_cached`), the
output processor turns its tokens into text and decides when it is done.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.quoting import excerpt
from app.stop import StopMatcher
from model.grammar import GrammarMatcher
from model.sampling import SamplingParamError, SamplingParams, TokenLogprob, validate_sampling
from model.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from app.engine.handle import RequestHandle


MIN_TOKENS_ABOVE_MAX = "min_tokens must not exceed max_tokens"  # the wire models check it too, same words


class EngineOverloaded(Exception):
    """The waiting queue is full (or the engine is not running): HTTP 503 + Retry-After."""


class EngineDraining(EngineOverloaded):
    """The engine is draining for shutdown and admits nothing new."""


class ContextLengthExceeded(ValueError):
    """Prompt + completion do not fit in a slot. The message is OpenAI's wording, which clients match on."""

    def __init__(self, max_context: int, prompt_tokens: int, max_tokens: int) -> None:
        self.max_context, self.prompt_tokens, self.max_tokens = max_context, prompt_tokens, max_tokens
        super().__init__(self.describe("prompt"))

    def describe(self, prompt_name: str) -> str:
        """The message, naming the prompt as the endpoint does ("prompt" or "messages")."""
        total = self.prompt_tokens + self.max_tokens
        return (
            f"This model's maximum context length is {self.max_context} tokens. However, you requested {total} "
            f"tokens ({self.prompt_tokens} in the {prompt_name}, {self.max_tokens} in the completion)."
        )


class InvalidRequest(ValueError):
    """A request the engine cannot run; `param` names the offending field (OpenAI's error.param)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class RequestFailed(RuntimeError):
    """Raised by a handle's iterator when its request failed inside the engine (or the engine died)."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16  # 0 is valid (prompt logprobs only)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    prompt_logprobs: bool = False  # echo + logprobs: logprobs of the prompt tokens
    # The output's grammar (structured outputs, tool calls); the engine advances it, so one per request.
    grammar: GrammarMatcher | None = None


@dataclass
class RequestTimings:
    """time.monotonic() stamps of one request's life."""

    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class GenerationOutput:
    text: str  # new text; never any part of a matched stop string; UTF-8 safe
    token_ids: list[int]  # new generated tokens
    logprobs: list[TokenLogprob] | None  # one per new token when sampling.logprobs is not None
    finish_reason: str | None  # "stop" | "length" | "abort" (cut by a drain) | None
    num_prompt_tokens: int
    num_generated_tokens: int  # running total
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only; entry 0 is None
    timings: RequestTimings | None = None  # on the final output
    # Character offset of each new token in the generated text, counted on the text this request sends
    # (what the legacy logprobs' text_offset reports); a token inside a split character gets the offset
    # where that character starts.
    text_offsets: list[int] = field(default_factory=list)


def out_of_vocabulary(param: str, token_id: object, vocab_size: int) -> InvalidRequest:
    """The one message for a token id the model does not have."""
    return InvalidRequest(f"{param} contains token id {excerpt(token_id)}, outside the vocabulary [0, {vocab_size})", param)


def check_request(request: GenerationRequest, vocab_size: int, max_seq_len: int) -> None:
    """Raise ContextLengthExceeded / InvalidRequest for what only the engine can check: ids against the
    vocabulary, lengths against the context. Shapes, types and OpenAI ranges are the wire models' job."""
    prompt = request.prompt_ids
    if not prompt:
        raise InvalidRequest("the prompt must contain at least one token", "prompt")
    for token_id in prompt:
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise out_of_vocabulary("prompt", token_id, vocab_size)
    if not isinstance(request.max_tokens, int) or request.max_tokens < 0:
        raise InvalidRequest("max_tokens must be an integer >= 0", "max_tokens")
    if not isinstance(request.min_tokens, int) or request.min_tokens < 0:
        raise InvalidRequest("min_tokens must be an integer >= 0", "min_tokens")
    if request.min_tokens > request.max_tokens:
        raise InvalidRequest(MIN_TOKENS_ABOVE_MAX, "min_tokens")
    if len(prompt) + request.max_tokens > max_seq_len:
        raise ContextLengthExceeded(max_seq_len, len(prompt), request.max_tokens)
    for token_id in request.stop_token_ids:
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise out_of_vocabulary("stop_token_ids", token_id, vocab_size)
    for token_id in request.sampling.logit_bias:
        if not 0 <= token_id < vocab_size:
            raise out_of_vocabulary("logit_bias", token_id, vocab_size)
    if any(not isinstance(s, str) for s in request.stop):
        raise InvalidRequest("stop must be a list of strings", "stop")
    try:
        validate_sampling(request.sampling, vocab_size)
    except SamplingParamError as e:
        raise InvalidRequest(str(e), e.param) from None


def stop_ids_of(request: GenerationRequest, tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that end this request: its own stop_token_ids, plus the model's end ids unless ignore_eos."""
    stops = set(request.stop_token_ids)
    if not request.ignore_eos:
        stops |= set(tokenizer.stop_ids)
        if tokenizer.eos_id is not None:
            stops.add(tokenizer.eos_id)
    return frozenset(stops)


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for a slot
    PREFILLING = "prefilling"  # in a slot, prompt not all in the cache yet
    DECODING = "decoding"  # one token per step
    FINISHED = "finished"  # stop, length, or ended by a drain
    CANCELLED = "cancelled"  # its client went away
    FAILED = "failed"  # an error in this request only

    @property
    def done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.FAILED)


@dataclass(eq=False)
class Request:
    """Engine-thread state of one request (identity-compared: two requests are never equal)."""

    handle: RequestHandle
    params: GenerationRequest
    stop_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    matcher: StopMatcher
    timings: RequestTimings
    order: int  # arrival order: prefill is first come, first served
    group: str = ""  # the API request this is a choice of (admission takes turns between groups)
    status: RequestStatus = RequestStatus.WAITING
    slot: int = -1
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    num_cached: int = 0  # tokens whose keys/values are in the slot
    num_cached_prompt: int = 0  # prompt tokens the prefix cache supplied (usage.prompt_tokens_details.cached_tokens)
    num_generated: int = 0
    text_length: int = 0  # characters the detokenizer has produced (the next token's text_offset)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    sent_first: bool = False
    # Work the engine gave itself (app/engine/idle_work.py): runs only when nothing else does, and only
    # while a free slot still offers `expected_reuse` tokens of its prompt.
    idle_work: bool = False
    expected_reuse: int = 0

    @property
    def request_id(self) -> str:
        return self.handle.request_id

    @property
    def num_prompt(self) -> int:
        return len(self.params.prompt_ids)

    @property
    def needs_model(self) -> bool:
        """max_tokens 0 without prompt logprobs asks for nothing the model computes (idle work wants the keys)."""
        return self.params.max_tokens > 0 or self.prompt_logprobs is not None or self.idle_work

    def cached(self, n: int) -> None:
        """n more tokens are in the slot; the prompt done, the request decodes."""
        self.num_cached += n
        if self.status is RequestStatus.PREFILLING and self.num_cached >= self.num_prompt:
            self.status = RequestStatus.DECODING
