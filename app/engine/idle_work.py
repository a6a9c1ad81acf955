"""Work the engine gives itself while it has nothing else to do: recomputing a finished answer's keys.

Why: with batch invariance the prefix cache offers only keys that a cold prefill would compute
bit for bit (app/engine/prefix_cache.py). An answer's keys came from decode kernels, so the next turn
of a chat, which resends the answer, prefilled it again while its user waited for the first token.
When a request finishes, the engine queues an internal request whose prompt is the finished request's
tokens (prompt and answer): run through the ordinary prefill path, it leaves prefill-computed keys
for the whole exchange in the slot, and the next turn reuses them. Users read an answer before they
reply, so that time is usually free.

It never costs a client anything: the scheduler admits such a request only when nothing else runs or
waits, drops it when its slot was given to someone else meanwhile, and ends it (keeping what it
computed) as soon as a client request arrives (Scheduler._admit). It produces no output, counts in no
usage or metric, and changes no bits: the cache's rules decide what is reused, as for any prompt.
"""

from __future__ import annotations

import time
from typing import Any

from app.engine.prefix_cache import PrefixCache
from app.engine.request import GenerationRequest, Request, RequestTimings
from app.stop import StopMatcher
from model.sampling import SamplingParams
from model.tokenizer import IncrementalDetokenizer, Tokenizer


class InternalHandle:
    """The handle of a request no client reads: outputs are dropped, it is never cancelled."""

    cancelled = False

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def put(self, item: Any) -> None:
        """Nobody listens."""


def answer_recompute(finished: Request, cache: PrefixCache, tokenizer: Tokenizer, max_seq_len: int, order: int) -> Request | None:
    """The internal request that recomputes `finished`'s answer into its slot, or None when there is nothing
    to gain: no exact cache (without exactness the answer's keys are offered as they are), no answer,
    echo + logprobs (the cache was bypassed), a full slot, or a slot that does not hold the prompt."""
    if not (cache.enabled and cache.exact) or finished.num_generated == 0 or finished.prompt_logprobs is not None:
        return None
    tokens = list(finished.tokens)
    if len(tokens) >= max_seq_len:
        return None
    reuse = cache.reusable(cache.slots[finished.slot].tokens, tokens)
    if reuse == 0 or reuse >= len(tokens) - 1:  # the slot keeps nothing of it (so no slot to extend), or nothing is new
        return None
    return Request(
        handle=InternalHandle(f"recompute-{finished.request_id}"),  # type: ignore[arg-type]
        params=GenerationRequest(prompt_ids=tokens, sampling=SamplingParams(temperature=0), max_tokens=0),
        stop_ids=frozenset(),
        detokenizer=IncrementalDetokenizer(tokenizer),
        matcher=StopMatcher([]),
        timings=RequestTimings(arrival=time.monotonic()),
        order=order,
        group=f"recompute-{finished.request_id}",
        tokens=tokens,
        idle_work=True,
        expected_reuse=reuse,
    )
