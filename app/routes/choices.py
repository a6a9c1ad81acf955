"""One choice of a generation response: its engine handle and everything it has produced so far."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

from app.engine import GenerationOutput, RequestHandle, TokenLogprob
from app.metrics import Metrics
from app.protocol.responses import Usage

log = logging.getLogger("llamaserve")


@dataclass
class Choice:
    index: int
    prompt_index: int  # which prompt of the request (n choices share one)
    handle: RequestHandle
    prompt_ids: list[int]
    echo_text: str = ""
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)  # of the generated tokens, in the generated text
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0
    last_output_at: float | None = None

    def add(self, out: GenerationOutput, metrics: Metrics) -> None:
        """Fold one engine output in, recording inter-token gaps and, at the end, the request's metrics."""
        at = time.monotonic()
        if out.token_ids and self.last_output_at is not None:
            gap = (at - self.last_output_at) / len(out.token_ids)
            metrics.observe_tokens([gap] * len(out.token_ids))
        if out.token_ids:
            self.last_output_at = at
        self.text.append(out.text)
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.text_offsets += out.text_offsets
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.num_generated_tokens = out.num_generated_tokens
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            metrics.observe_finished(out.finish_reason, out.num_prompt_tokens, out.num_generated_tokens, out.timings)

    def abort(self, metrics: Metrics) -> None:
        """Cancel the engine request if it has not finished (client gone, stream closed); counted once."""
        self.handle.cancel()
        if self.finish_reason is None:
            self.finish_reason = "abort"  # internal only: never serialised
            metrics.observe_finished("abort", self.num_prompt_tokens, self.num_generated_tokens, None)


def wire_finish_reason(reason: str | None) -> Literal["stop", "length"]:
    """A whole response's finish_reason: a drain cut ("abort") reads as "length", the text is all there is."""
    return "stop" if reason in (None, "stop") else "length"


def usage_of(choices: list[Choice]) -> Usage:
    """Prompt tokens (and their cached part) once per prompt, shared by its n choices; completion tokens over all choices."""
    usage = Usage()
    seen: set[int] = set()
    for c in choices:
        prompt = c.num_prompt_tokens or len(c.prompt_ids)
        first = c.prompt_index not in seen
        usage.add(prompt if first else 0, c.num_generated_tokens, c.num_cached_tokens if first else 0)
        seen.add(c.prompt_index)
    return usage


def outcome(choices: list[Choice]) -> Callable[[], str]:
    """What the request-end log line says about the choices (read when the response has been sent)."""

    def text() -> str:
        reasons = ", ".join(c.finish_reason or "unfinished" for c in choices[:4]) + (", ..." if len(choices) > 4 else "")
        return f"finish_reason {reasons}; {sum(c.num_generated_tokens for c in choices)} completion token(s)"

    return text
