"""Tokens -> what the client receives: text, stop decisions, finish reasons, text offsets.

Stopping: a request with a grammar ends with "stop" as soon as the grammar is complete (its mask
then allows nothing but an end token, so that token need not be generated). The request's stop ids
end it with "stop" once min_tokens tokens exist (before that the sampler bans them); the stop token
counts as generated but is not rendered. Stop strings (app/stop.py) end it with "stop" and are never
sent. max_tokens or a full slot end it with "length", a drain that runs out of time with "abort".
Text is pushed through one detokenizer per request, so the text offsets that logprobs report are
offsets into the very text sent.
"""

from __future__ import annotations

import time

from app.engine.request import GenerationOutput, Request, RequestStatus
from model.sampling import TokenLogprob


class GrammarViolation(RuntimeError):
    """A sampled token the request's grammar does not allow (fails that request only)."""


class OutputProcessor:
    def __init__(self, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len

    def accept(self, request: Request, token: int, logprob: TokenLogprob | None) -> GenerationOutput:
        """Append one generated token; its text; finish the request when it should stop."""
        now = time.monotonic()
        params = request.params
        request.tokens.append(token)
        request.num_generated += 1
        if request.timings.first_token is None:
            request.timings.first_token = now
        offset = request.text_length
        finish: str | None = None
        grammar = params.grammar
        if grammar is not None and not grammar.accept(token):  # the sampler's mask forbids this: a bug, fail loudly
            raise GrammarViolation(f"token {token} is not allowed by the request's grammar")
        if token in request.stop_ids and request.num_generated > params.min_tokens:
            finish = "stop"
            text = self._flush(request)
        else:
            text = self._push(request, request.detokenizer.push(token))
            if request.matcher.matched is not None:
                finish = "stop"
            elif grammar is not None and grammar.is_stopped:
                finish = "stop"
                text += self._flush(request)
            elif request.num_generated >= params.max_tokens or len(request.tokens) >= self.max_seq_len:
                finish = "length"
                text += self._flush(request)
                if request.matcher.matched is not None:
                    finish = "stop"
        logprobs = [logprob] if params.sampling.logprobs is not None and logprob is not None else None
        return self.output(request, text, [token], logprobs, finish, [offset])

    def end(self, request: Request, reason: str) -> GenerationOutput:
        """End a request now with what it has: "length" when max_tokens is 0, "abort" when a drain ran
        out of time (so that clients can tell it from max_tokens)."""
        text = self._flush(request)
        return self.output(request, text, [], [] if request.params.sampling.logprobs is not None else None, reason)

    def output(
        self,
        request: Request,
        text: str,
        token_ids: list[int],
        logprobs: list[TokenLogprob] | None,
        finish: str | None,
        offsets: list[int] | None = None,
    ) -> GenerationOutput:
        if finish is not None:
            request.timings.finished = time.monotonic()
            request.status = RequestStatus.FINISHED
        out = GenerationOutput(
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=finish,
            num_prompt_tokens=request.num_prompt,
            num_cached_tokens=request.num_cached_prompt,
            num_generated_tokens=request.num_generated,
            prompt_logprobs=None if request.sent_first else request.prompt_logprobs,
            timings=request.timings if finish is not None else None,
            text_offsets=offsets or [],
        )
        request.sent_first = True
        return out

    @staticmethod
    def _push(request: Request, piece: str) -> str:
        request.text_length += len(piece)
        return request.matcher.push(piece)

    def _flush(self, request: Request) -> str:
        return self._push(request, request.detokenizer.flush()) + request.matcher.flush()
