"""Who runs this step: slots for waiting requests, which prompt chunks prefill, which rows decode.

The scheduler owns the waiting queue and the slot table and nothing else: it never touches tensors.
A waiting request takes the free slot that holds the longest reusable prefix of its prompt (the prefix
cache: app/engine/prefix_cache.py) and prefills only the rest; where the lowest free slot offers as much,
it takes that one, so decoding rows stay on consecutive slots (read in place), and what that slot held
moves to the slot the cache would have given up. Where requests ending leave the decoding rows spread
wider than the model reads in place, one moves into a free slot between the others (_bring_together).
Prefill is chunked: at most `prefill_chunk` prompt tokens per step in all, first come first served,
each prompt cut at multiples of `prefill_chunk` from its own start (so its numbers never depend on the
other prompts: model/invariance.py). A long prompt therefore delays
the running streams by at most one chunk per step instead of its whole length. Admission takes turns
between API requests, so one request with many choices cannot hold every slot (_next_waiting).
Work the engine gives itself (recomputing a finished answer for the prefix cache: app/engine/idle_work.py)
runs only once no client request has run or waited for IDLE_GRACE_S, and yields its slot as soon as one
arrives.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from app.engine.prefix_cache import PrefixCache
from app.engine.request import EngineOverloaded, Request, RequestStatus

# How long the engine must have had no client work before it starts its own. A program sends its next
# request within milliseconds of the last answer (a benchmark, an agent loop, a batch of evaluations), and
# idle work started in between would hold that request up for a step; a person reads for seconds.
IDLE_GRACE_S = 0.3


@dataclass
class PrefillChunk:
    request: Request
    start: int  # first prompt position of the chunk
    length: int

    @property
    def last(self) -> bool:
        """This chunk completes the prompt (its last logits give the first token)."""
        return self.start + self.length >= self.request.num_prompt


@dataclass
class PrefixCopy:
    """Keys/values of positions [0, length) from one slot to another: a prompt prefix another running
    request computed (the n choices of one request, concurrent requests with one system prompt)."""

    source: int
    target: int
    length: int
    moves_request: bool = False  # the request in `source` continues in `target`: its sampling state goes too


@dataclass
class StepPlan:
    """One step's work. The model runner executes admitted/prefill/decode; the rest is bookkeeping."""

    admitted: list[Request] = field(default_factory=list)  # new in a slot: their sampling state must be set
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)  # in slot order
    cancelled: list[Request] = field(default_factory=list)  # their clients left; slots already freed
    ended: list[Request] = field(default_factory=list)  # a drain ran out of time: end with what they have
    no_compute: list[Request] = field(default_factory=list)  # max_tokens 0 without logprobs: done at once
    copies: list[PrefixCopy] = field(default_factory=list)  # run before the prefill chunks

    @property
    def runs_model(self) -> bool:
        return bool(self.prefill or self.decode or self.copies)


class Scheduler:
    def __init__(
        self,
        max_batch_size: int,
        prefill_chunk: int,
        max_queue: int,
        lock: threading.Condition,
        prefix_cache: PrefixCache | None = None,
        share_prefixes: bool = False,
        decode_window: Callable[[int], int | None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        # `lock` guards `waiting`, the one structure the event loop touches (add) besides this thread. A
        # request stays in `waiting` until it is in `running`, and both move under the lock, so stats()
        # and drain() never miss one while its slot is being set up.
        self.lock = lock
        self.waiting: deque[Request] = deque()
        self.idle_work: deque[Request] = deque(maxlen=max_batch_size)  # engine thread only; the oldest drop out
        self.last_client_work = time.monotonic()  # when a client request last ran or waited (engine thread)
        self.running: dict[int, Request] = {}  # slot -> request
        self.free: list[int] = list(range(max_batch_size))
        # Which free slot a request gets: the one holding the longest reusable prefix of its prompt.
        self.prefix_cache = prefix_cache or PrefixCache(max_batch_size, prefill_chunk, enabled=False)
        self.can_copy = share_prefixes  # the model copies keys between slots (copy_prefix)
        self.share_prefixes = share_prefixes and self.prefix_cache.enabled
        # How many consecutive slots n decoding rows must lie within for the model to read their keys in
        # place (model/static_step.StaticStep.decode_window); None: the model has no such rule.
        self.decode_window = decode_window if share_prefixes else None  # bringing rows together copies keys

    def add(self, request: Request) -> None:
        """Queue a request (event loop, under `lock`); raises EngineOverloaded when the queue is full."""
        if len(self.waiting) >= self.max_queue:
            raise EngineOverloaded(f"too many requests waiting ({self.max_queue}); retry later")
        self.waiting.append(request)

    def add_idle_work(self, request: Request) -> None:
        """Queue work the engine gives itself (engine thread): it runs when nothing else does."""
        self.idle_work.append(request)

    def has_work(self) -> bool:
        """Call under `lock`."""
        return bool(self.running) or bool(self.waiting) or self.idle_work_wait() == 0

    def idle_work_wait(self) -> float | None:
        """Seconds until queued idle work may start (0: now), None when there is none."""
        if not self.idle_work:
            return None
        return max(0.0, IDLE_GRACE_S - (time.monotonic() - self.last_client_work))

    def has_client_work(self) -> bool:
        """A client's request runs or waits (a drain waits for these only). Call under `lock`."""
        return bool(self.waiting) or any(not r.idle_work for r in self.running.values())

    def schedule(self, end_all: bool = False) -> StepPlan:
        """Plan one step; `end_all` (a drain that timed out) ends every request instead."""
        plan = StepPlan(cancelled=self._reap_cancelled())
        if end_all:
            plan.ended = self._take_all()
            return plan
        self._admit(plan)
        plan.decode = [r for _, r in sorted(self.running.items()) if r.status is RequestStatus.DECODING]
        self._bring_together(plan)
        plan.prefill = self._prefill_chunks(plan.copies)
        return plan

    def release(self, request: Request, failed: bool = False) -> None:
        """Give a request's slot back (idempotent); what it computed stays for the prefix cache unless it failed."""
        if self.running.get(request.slot) is request:
            del self.running[request.slot]
            self.free.append(request.slot)
            if not request.idle_work:
                self.last_client_work = time.monotonic()
            self.prefix_cache.release(request.slot, request.tokens, request.num_cached, failed)

    def take_everything(self) -> list[Request]:
        """Empty the engine (it is stopping or died): every request, running first, slots reset."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        running, self.running = list(self.running.values()), {}
        self.idle_work.clear()
        self.free = list(range(self.max_batch_size))
        self.prefix_cache.forget_all()
        return running + waiting

    def _reap_cancelled(self) -> list[Request]:
        cancelled = [r for r in self.running.values() if r.handle.cancelled]
        for request in cancelled:
            self.release(request)
        with self.lock:
            waiting = [r for r in self.waiting if r.handle.cancelled]
            for request in waiting:
                self.waiting.remove(request)
        for request in cancelled + waiting:
            request.status = RequestStatus.CANCELLED
        return cancelled + waiting

    def _take_all(self) -> list[Request]:
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        running = list(self.running.values())
        for request in running:
            self.release(request)
        return running + waiting

    def _admit(self, plan: StepPlan) -> None:
        with self.lock:
            clients_waiting = bool(self.waiting)
        if clients_waiting or any(not r.idle_work for r in self.running.values()):
            self.last_client_work = time.monotonic()
        if clients_waiting:  # idle work yields: what it computed so far stays in the cache
            for request in [r for r in self.running.values() if r.idle_work]:
                self.release(request)
                request.status = RequestStatus.CANCELLED
                plan.cancelled.append(request)
        while True:
            with self.lock:
                if not self.waiting:
                    break
                request = self._next_waiting()
                if not request.needs_model:  # no slot needed
                    self.waiting.remove(request)
                    plan.no_compute.append(request)
                    continue
                if not self.free:
                    return
                prompt = request.params.prompt_ids
                # Echo + logprobs needs every prompt position's logits: it reuses nothing.
                use_cache = request.prompt_logprobs is None
                chosen, reuse = self.prefix_cache.choose(self.free, prompt, use_cache=use_cache)
                self._place(request, self._lowest_free_slot(chosen, prompt if use_cache else [], reuse, plan.copies), reuse, plan)
                self.waiting.remove(request)
        if not self.running and self.idle_work_wait() == 0:
            self._admit_idle_work(plan)

    def _admit_idle_work(self, plan: StepPlan) -> None:
        """The oldest idle work whose prompt a free slot still offers as far as when it was queued (else its
        slot went to a client request meanwhile, and it is dropped); one at a time, in that slot."""
        while self.idle_work:
            request = self.idle_work.popleft()
            prompt = request.params.prompt_ids
            slot, reuse = self.prefix_cache.choose(self.free, prompt, count=False)
            if reuse >= request.expected_reuse:
                self._place(request, slot, reuse, plan)
                return

    def _place(self, request: Request, slot: int, reuse: int, plan: StepPlan) -> None:
        """Admit a request into a free slot whose first `reuse` prompt tokens it takes from the cache."""
        request.slot = slot
        self.free.remove(slot)
        self.prefix_cache.start(slot, request.params.prompt_ids, reuse)
        request.num_cached = request.num_cached_prompt = reuse
        request.status = RequestStatus.PREFILLING
        request.timings.scheduled = time.monotonic()
        self.running[slot] = request
        plan.admitted.append(request)

    def _lowest_free_slot(self, chosen: int, prompt: list[int], reuse: int, copies: list[PrefixCopy]) -> int:
        """The lowest free slot instead of the cache's choice when it offers as much of the prompt (`reuse`
        tokens; nothing, on a miss): decoding rows then stay within a few consecutive slots, whose keys
        the decode step reads in place instead of gathering them (model/static_step.py: 5-25% of a step).
        The cache chose among equals the least recently used slot, whose content the request gives up;
        what the lowest slot holds is copied there first, so the cache keeps what it would have kept.
        A model that cannot copy between slots keeps the cache's choice."""
        lowest, cache = min(self.free), self.prefix_cache
        if lowest == chosen or (cache.reusable(cache.slots[lowest].tokens, prompt) if prompt else 0) != reuse:
            return chosen
        held = len(cache.slots[lowest].tokens) if cache.enabled else 0
        if held:
            if not self.can_copy:
                return chosen
            copies.append(PrefixCopy(lowest, chosen, held))
            cache.move(lowest, chosen)
        return lowest

    def _bring_together(self, plan: StepPlan) -> None:
        """Move decoding requests into free slots until the decode rows lie within the window the model
        reads in place (a 2-row step on slots 0 and 20 would otherwise run as a 32-row one). Keeps the
        window holding the most rows (the lowest among equals), so the fewest requests move; each move
        copies the request's keys once (`moves_request`), about a millisecond for a few hundred tokens.
        Where free slots inside no window suffice (prefilling requests hold them), nothing moves."""
        rows = plan.decode
        width = self.decode_window(len(rows)) if self.decode_window is not None and rows else None
        slots = [r.slot for r in rows]
        if width is None or max(slots) - min(slots) < width:
            return
        free, best, best_inside = set(self.free), -1, -1
        for start in range(self.max_batch_size - width + 1):
            inside = sum(start <= s < start + width for s in slots)
            room = sum(s in free for s in range(start, start + width))
            if room >= len(rows) - inside and inside > best_inside:
                best, best_inside = start, inside
        if best < 0:
            return
        targets = sorted(s for s in free if best <= s < best + width)
        for request, target in zip([r for r in rows if not best <= r.slot < best + width], targets):
            source = request.slot
            plan.copies.append(PrefixCopy(source, target, request.num_cached, moves_request=True))
            self.prefix_cache.moved(source, target)
            del self.running[source]
            self.running[target] = request
            self.free.remove(target)
            self.free.append(source)
            request.slot = target
        rows.sort(key=lambda r: r.slot)

    def _next_waiting(self) -> Request:
        """The oldest waiting request of the group (API request) with the fewest choices in slots.

        One request with many choices (prompts x n) takes turns with the others instead of holding
        every slot until all of its choices are done: a small request sent after it gets the next free
        slot. Requests that are their own group (one choice each) are first come, first served.
        """
        running = Counter(r.group for r in self.running.values())
        return min(self.waiting, key=lambda r: running[r.group])  # min keeps the first (oldest) of equals

    def _prefill_chunks(self, copies: list[PrefixCopy]) -> list[PrefillChunk]:
        """Whole chunks up to prefill_chunk tokens in all (at least one). A chunk larger than what is
        left of the budget waits for the next step; smaller ones behind it may go first. With prefix
        sharing, a prompt first borrows what other slots computed of it (`copies`), and waits while an
        earlier request is still computing a prefix it could borrow."""
        budget, chunks = self.prefill_chunk, []
        prefilling = sorted((r for r in self.running.values() if r.status is RequestStatus.PREFILLING), key=lambda r: r.order)
        for request in prefilling:
            if self.share_prefixes and self._borrow(request, prefilling, copies):
                continue
            n = self._chunk_length(request)
            if n > budget and budget < self.prefill_chunk:
                continue
            budget -= n
            chunks.append(PrefillChunk(request, request.num_cached, n))
            if budget <= 0:
                break
        return chunks

    def _chunk_length(self, request: Request) -> int:
        """Up to the next multiple of prefill_chunk: after a cached prefix, the chunks line up with a cold
        prefill's. Where prefill rows were checked independent of their chunk (the cache reuses within
        chunks), a prompt whose rest crosses one boundary and fits one chunk is read in one go instead: a
        cold prefill computes both sides of the boundary on the dense kernels too (the part past it is at
        least `dense_from` long), so the bits are the same, and the first token comes a step earlier."""
        start, end, chunk = request.num_cached, request.num_prompt, self.prefill_chunk
        n = min(end - start, chunk - start % chunk)
        cache = self.prefix_cache
        if cache.reuses_within_chunks and start + n < end <= start + chunk and end - (start + n) >= cache.dense_from:
            return end - start
        return n

    def _borrow(self, request: Request, prefilling: list[Request], copies: list[PrefixCopy]) -> bool:
        """Copy the longest reusable prefix of the request's prompt that another running slot holds, if
        longer than what it has; True when it should wait for an earlier request still computing more."""
        prompt, cache = request.params.prompt_ids, self.prefix_cache
        if request.prompt_logprobs is not None:
            return False
        best, source = request.num_cached, -1
        for other in self.running.values():
            if other is not request:
                reuse = cache.reusable(cache.slots[other.slot].tokens, prompt)
                if reuse > best:
                    best, source = reuse, other.slot
        if source >= 0:
            copies.append(PrefixCopy(source, request.slot, best))
            cache.start(request.slot, prompt, best)
            cache.stats.hits += best - request.num_cached
            request.num_cached_prompt += best - request.num_cached
            request.num_cached = best
        for other in prefilling:
            if other.order >= request.order:
                break
            if cache.reusable(other.params.prompt_ids, prompt) > request.num_cached:
                return True  # it will hold more of this prompt soon: borrow then instead of computing twice
        return False
