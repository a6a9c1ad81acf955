"""The engine: one thread owns the model and its KV cache and runs continuous batching over slots.

Threads. `submit` runs on the asyncio event loop: it validates, queues, and returns a RequestHandle
at once. The engine thread sleeps on a Condition while there is no work (it never spins), and pushes
each GenerationOutput into the handle's asyncio.Queue with loop.call_soon_threadsafe, so the event
loop never blocks on the model.

A step. (1) Cancelled requests give back their slots. (2) Waiting requests take free slots, lowest
first (so a full house of B requests runs as slots 0..B-1 and the cache is read as a view). (3)
Chunked prefill: at most `prefill_chunk` prompt tokens per step in all, in admission order, one
prompt per forward, each prompt cut into chunks at multiples of `prefill_chunk` from its start (so
its numbers never depend on the other prompts: see model/invariance.py). A long prompt therefore
delays the running streams by at most one chunk per step instead of by its whole length. Measured on SmolLM2-135M, 2 CPU cores, int4 weights (docs/performance.md): a 512-token chunk
(the default) takes ~310 ms, about 3 batch-32 decode steps; against 256 it raised 32-client
throughput from 278 to ~292 tok/s and cut TTFT p50 from 1.45 to ~1.05 s, while 1024 was no faster.
In float32 (`--quantization none`) a 512-token chunk takes ~510 ms, about 4.5 batch-32 steps.
Lower it for smoother streams, raise it for a faster first token on long prompts. A prompt
whose last chunk ran samples its first token from that chunk's logits. (4) One batched decode step for every request that was already decoding.

Stopping: the model's stop ids (unless ignore_eos) and stop_token_ids end with "stop" once
min_tokens tokens exist (before that they are banned in sampling); the stop token counts as
generated but is not rendered. Stop strings (app/stop.py) end with "stop" and are never emitted.
max_tokens or a full slot end with "length".

Failure. An exception while handling one request (admission, its tokens) fails that request only:
its iterator raises RequestFailed. An exception in the batched forward or sampling kills the loop:
stats().healthy turns False, submit raises EngineOverloaded, and every pending handle gets
RequestFailed instead of hanging.

Drain: submit raises EngineDraining (an EngineOverloaded); running and waiting requests may finish
until the timeout; those still unfinished then end with a final output (the text so far flushed,
finish_reason "length") so that clients see a well-formed end.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import torch

from app.stop import StopMatcher
from model.sampling import (
    Sampler,
    SamplingParamError,
    SamplingParams,
    TokenLogprob,
    prompt_logprobs,
    validate_sampling,
)
from model.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "ContextLengthExceeded",
    "Engine",
    "EngineDraining",
    "EngineOverloaded",
    "EngineStats",
    "GenerationOutput",
    "GenerationRequest",
    "InvalidRequest",
    "RequestFailed",
    "RequestHandle",
    "RequestTimings",
    "SamplingParams",
    "TokenLogprob",
]

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """The waiting queue is full (or the engine is not running): HTTP 503 + Retry-After."""


class EngineDraining(EngineOverloaded):
    """The engine is draining for shutdown and admits nothing new."""


class ContextLengthExceeded(ValueError):
    def __init__(self, max_context: int, prompt_tokens: int, max_tokens: int) -> None:
        self.max_context, self.prompt_tokens, self.max_tokens = max_context, prompt_tokens, max_tokens
        super().__init__(
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion)."
        )


class InvalidRequest(ValueError):
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
    finish_reason: str | None  # "stop" | "length" | None
    num_prompt_tokens: int
    num_generated_tokens: int  # running total
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only; entry 0 is None
    timings: RequestTimings | None = None  # on the final output


@dataclass
class EngineStats:
    running: int
    waiting: int
    free_slots: int
    max_batch_size: int
    prompt_tokens_total: int
    generated_tokens_total: int
    steps: int
    last_step_duration: float  # seconds
    last_step_time: float | None  # time.monotonic() of the end of the last step
    healthy: bool
    accepting: bool


_END = object()  # queue sentinel: the iterator ends without an output (its owner cancelled it)


class RequestHandle:
    """What submit returns: iterate it for outputs; cancel() (or closing the iterator) frees the slot."""

    def __init__(self, request_id: str, engine: "Engine", loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.cancelled = False
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._done = False

    def cancel(self) -> None:
        """Idempotent; the engine frees the slot at its next step and the iterator ends."""
        if not self.cancelled and not self._done:
            self.cancelled = True
            self._engine._wake()

    def __aiter__(self) -> AsyncIterator[GenerationOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[GenerationOutput]:
        try:
            while True:
                item = await self._queue.get()
                if item is _END or self.cancelled:  # outputs already queued are dropped after cancel()
                    self._done = True
                    return
                if isinstance(item, BaseException):
                    self._done = True
                    raise item
                if item.finish_reason is not None:
                    self._done = True
                yield item
                if self._done:
                    return
        finally:
            if not self._done:
                self.cancel()

    def _put(self, item: Any) -> None:
        """From the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancelled = True


@dataclass(eq=False)
class _Sequence:
    """Engine-thread state of one request."""

    handle: RequestHandle
    request: GenerationRequest
    stop_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    matcher: StopMatcher
    timings: RequestTimings
    order: int
    slot: int = -1
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    num_cached: int = 0  # tokens whose keys/values are in the slot
    num_generated: int = 0
    prompt_lps: list[TokenLogprob | None] | None = None
    sent_first: bool = False

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.num_prompt


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int,
        max_seq_len: int,
        max_queue: int = 256,
        prefill_chunk: int = 512,
    ) -> None:
        if max_batch_size < 1 or max_batch_size > model.max_batch_size:
            raise ValueError(f"max_batch_size {max_batch_size} must be in 1..{model.max_batch_size} (the model's cache)")
        if max_seq_len < 1 or max_seq_len > model.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} must be in 1..{model.max_seq_len} (the model's cache)")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.vocab_size: int = model.args.vocab_size
        self.device = model.tok_embeddings.weight.device
        # Built on the engine thread (see _run): the only thread that runs parallel torch ops.
        self.sampler: Sampler = None  # type: ignore[assignment]
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()  # guarded by _cond
        self._running: dict[int, _Sequence] = {}  # slot -> sequence; engine thread only
        self._free: list[int] = list(range(max_batch_size))  # a heap: lowest slot first
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._abort = False
        self._healthy = True
        self._accepting = True
        self._prompt_tokens_total = 0
        self._generated_tokens_total = 0
        self._steps = 0
        self._last_step_duration = 0.0
        self._last_step_time: float | None = None
        self.step_batch_sizes: list[int] = []  # running count per step, kept short (tests/diagnostics)

    # ------------------------------------------------------------------ public API (event loop side)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llamaserve-engine", daemon=True)
            self._thread.start()

    def validate(self, request: GenerationRequest) -> None:
        """Raise ContextLengthExceeded / InvalidRequest for a request the engine cannot run."""
        prompt = request.prompt_ids
        if not prompt:
            raise InvalidRequest("the prompt must contain at least one token", "prompt")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
            bad = next(t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab_size)
            raise InvalidRequest(f"prompt token id {bad!r} is not in the vocabulary (0..{self.vocab_size - 1})", "prompt")
        if not isinstance(request.max_tokens, int) or request.max_tokens < 0:
            raise InvalidRequest("max_tokens must be an integer >= 0", "max_tokens")
        if not isinstance(request.min_tokens, int) or request.min_tokens < 0:
            raise InvalidRequest("min_tokens must be an integer >= 0", "min_tokens")
        if request.min_tokens > request.max_tokens:
            raise InvalidRequest("min_tokens must not exceed max_tokens", "min_tokens")
        if len(prompt) + request.max_tokens > self.max_seq_len:
            raise ContextLengthExceeded(self.max_seq_len, len(prompt), request.max_tokens)
        for t in request.stop_token_ids:
            if not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidRequest(f"stop_token_ids entry {t!r} is not in the vocabulary", "stop_token_ids")
        if any(not isinstance(s, str) for s in request.stop):
            raise InvalidRequest("stop must be a list of strings", "stop")
        try:
            validate_sampling(request.sampling, self.vocab_size)
        except SamplingParamError as e:
            raise InvalidRequest(str(e), e.param) from None

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate and queue; call from the event loop. Raises at once instead of queueing too much."""
        self.validate(request)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        with self._cond:
            if not self._healthy:
                raise EngineOverloaded("the engine is not running")
            if not self._accepting:
                raise EngineDraining("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise EngineOverloaded(f"too many requests waiting ({self.max_queue}); retry later")
            order = next(self._ids)
            handle = RequestHandle(f"req-{order}", self, loop)
            self._waiting.append(self._new_sequence(handle, request, order, now))
            self._cond.notify()
        return handle

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let work finish for up to `timeout` s, then end what is left ("length")."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self._busy() and self._healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not self._busy() or not self._healthy:
            return
        with self._cond:
            self._abort = True
            self._cond.notify()
        while self._busy() and self._healthy and self._thread is not None and self._thread.is_alive():
            await asyncio.sleep(0.01)

    def shutdown(self) -> None:
        """Stop the thread; requests still pending get RequestFailed."""
        with self._cond:
            self._stopping = True
            self._accepting = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        else:
            self._fail_all(RequestFailed("the engine was shut down"))

    def stats(self) -> EngineStats:
        with self._cond:  # admission moves a request from waiting to running under this lock
            running, waiting = len(self._running), len(self._waiting)
        return EngineStats(
            running=running,
            waiting=waiting,
            free_slots=self.max_batch_size - running,
            max_batch_size=self.max_batch_size,
            prompt_tokens_total=self._prompt_tokens_total,
            generated_tokens_total=self._generated_tokens_total,
            steps=self._steps,
            last_step_duration=self._last_step_duration,
            last_step_time=self._last_step_time,
            healthy=self._healthy,
            accepting=self._accepting and self._healthy,
        )

    # ------------------------------------------------------------------ engine thread

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _busy(self) -> bool:
        with self._cond:  # see _admit: read both sides of the move at once
            return bool(self._running) or bool(self._waiting)

    def _new_sequence(self, handle: RequestHandle, request: GenerationRequest, order: int, now: float) -> _Sequence:
        stops = set(request.stop_token_ids)
        if not request.ignore_eos:
            stops |= set(self.tokenizer.stop_ids)
            if self.tokenizer.eos_id is not None:
                stops.add(self.tokenizer.eos_id)
        return _Sequence(
            handle=handle,
            request=request,
            stop_ids=frozenset(stops),
            detokenizer=IncrementalDetokenizer(self.tokenizer),
            matcher=StopMatcher(request.stop),
            timings=RequestTimings(arrival=now),
            order=order,
            tokens=list(request.prompt_ids),
            prompt_lps=[None] if request.prompt_logprobs else None,
        )

    def _run(self) -> None:
        try:
            # Every live thread that runs a parallel torch op keeps its own OpenMP pool, and with more
            # pool threads than cores libgomp stops spin-waiting: decode got ~1.7x slower. So this
            # thread allocates the sampler's tensors itself and the event loop thread never does.
            self.sampler = Sampler(self.max_batch_size, self.vocab_size, self.device)
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._stopping and not self._waiting and not self._running:
                            self._cond.wait()
                        if self._stopping:
                            break
                    self._step()
        except BaseException as e:  # the loop itself failed: nothing may hang on it
            log.exception("engine loop died")
            with self._cond:
                self._healthy = False
                self._accepting = False
            self._fail_all(RequestFailed(f"the engine failed: {e!r}"))
            return
        self._fail_all(RequestFailed("the engine was shut down"))

    def _step(self) -> None:
        start = time.monotonic()
        self._reap_cancelled()
        if self._abort:
            self._abort_all()
        self._admit()
        decoding = [s for s in sorted(self._running.values(), key=lambda s: s.slot) if not s.prefilling]
        self.step_batch_sizes.append(len(self._running))
        del self.step_batch_sizes[:-1000]
        self._prefill()
        self._decode(decoding)
        self._steps += 1
        self._last_step_time = time.monotonic()
        self._last_step_duration = self._last_step_time - start

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self._running.values() if s.handle.cancelled]:
            self._release(seq)
            seq.handle._put(_END)
        with self._cond:
            cancelled = [s for s in self._waiting if s.handle.cancelled]
            for seq in cancelled:
                self._waiting.remove(seq)
        for seq in cancelled:
            seq.handle._put(_END)

    def _admit(self) -> None:
        # A request stays in _waiting until it is in _running (only this thread removes it): drain()
        # and stats() must never miss it while its slot is being set up (drain returned early).
        while self._free:
            with self._cond:
                if not self._waiting:
                    return
                seq = self._waiting[0]
            slot = self._free[0]
            suppress = sorted(seq.stop_ids) if seq.request.min_tokens > 0 else ()
            try:
                self.sampler.set_slot(slot, seq.request.sampling, seq.request.prompt_ids, suppress)
            except Exception as e:  # one bad request (e.g. a logit_bias id that got past validation)
                with self._cond:
                    self._waiting.popleft()
                self._fail(seq, e)
                continue
            seq.slot = heapq.heappop(self._free)
            seq.timings.scheduled = time.monotonic()
            with self._cond:
                self._running[slot] = seq
                self._waiting.popleft()
            if seq.request.max_tokens == 0 and seq.prompt_lps is None:  # nothing to compute at all
                self._finish_without_tokens(seq)

    def _prefill(self) -> None:
        """Run whole prompt chunks, up to prefill_chunk tokens in all (at least one chunk a step).

        One prompt per forward, cut at multiples of prefill_chunk from its start: the shapes a
        prompt is computed with depend on that prompt alone, never on who else is prefilling, which
        keeps its prompt logprobs, cache and first token batch-invariant (model/invariance.py). A
        chunk larger than what is left of the budget waits for the next step; smaller ones behind
        it may go first.
        """
        budget = self.prefill_chunk
        finished: list[tuple[_Sequence, torch.Tensor]] = []
        for seq in sorted((s for s in self._running.values() if s.prefilling), key=lambda s: s.order):
            n = min(seq.num_prompt - seq.num_cached, self.prefill_chunk)
            if n > budget and budget < self.prefill_chunk:
                continue
            budget -= n
            last_logits = self._prefill_chunk(seq, n)
            if last_logits is not None:
                finished.append((seq, last_logits))
            if budget <= 0:
                break
        if finished:
            self._sample_and_emit([seq for seq, _ in finished], torch.stack([row for _, row in finished]))

    def _prefill_chunk(self, seq: _Sequence, n: int) -> torch.Tensor | None:
        """Read the next n prompt tokens of `seq`; the logits of its last prompt token once the
        whole prompt is in (None before that, or when max_tokens is 0 and the request is done)."""
        start = seq.num_cached
        positions = torch.arange(start, start + n, device=self.device)[None]
        logits = self.model(
            torch.tensor([seq.tokens[start : start + n]], device=self.device),
            positions,
            self._slot_tensor([seq.slot]),
            kv_len=start + n,
            all_logits=seq.prompt_lps is not None,
        )
        if seq.prompt_lps is not None:
            self._collect_prompt_logprobs(seq, logits[0], n)
        seq.num_cached += n
        self._prompt_tokens_total += n
        if seq.prefilling:
            return None
        if seq.request.max_tokens == 0:
            self._finish_without_tokens(seq)
            return None
        return logits[0, -1] if logits.dim() == 3 else logits[0]

    def _decode(self, seqs: list[_Sequence]) -> None:
        seqs = [s for s in seqs if s.slot in self._running and self._running[s.slot] is s]
        if not seqs:
            return
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        positions = [len(s.tokens) - 1 for s in seqs]
        logits = self.model(
            tokens,
            torch.tensor([[p] for p in positions], device=self.device),
            self._slot_tensor([s.slot for s in seqs]),
            kv_len=max(positions) + 1,
        )
        for seq in seqs:
            seq.num_cached += 1
        self._sample_and_emit(seqs, logits)

    def _slot_tensor(self, slots: Sequence[int]) -> torch.Tensor | None:
        """None when row b is slot b (the cache is then read as a view, not gathered)."""
        if list(slots) == list(range(len(slots))):
            return None
        return torch.tensor(list(slots), device=self.device)

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        suppress = [s.num_generated < s.request.min_tokens for s in seqs]
        result = self.sampler.sample(logits, [s.slot for s in seqs], suppress)
        for row, seq in enumerate(seqs):
            try:
                logprob = result.logprobs[row] if result.logprobs is not None else None
                self._accept(seq, result.token_ids[row], logprob)
            except Exception as e:  # this request only
                self._release(seq)
                self._fail(seq, e)

    def _accept(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Append one generated token; emit its text; finish the request when it should stop."""
        now = time.monotonic()
        seq.tokens.append(token)
        seq.num_generated += 1
        self._generated_tokens_total += 1
        if seq.timings.first_token is None:
            seq.timings.first_token = now
        finish: str | None = None
        if token in seq.stop_ids and seq.num_generated > seq.request.min_tokens:
            finish = "stop"
            text = seq.matcher.push(seq.detokenizer.flush()) + seq.matcher.flush()
        else:
            text = seq.matcher.push(seq.detokenizer.push(token))
            if seq.matcher.matched is not None:
                finish = "stop"
            elif seq.num_generated >= seq.request.max_tokens or len(seq.tokens) >= self.max_seq_len:
                finish = "length"
                text += seq.matcher.push(seq.detokenizer.flush())
                text += seq.matcher.flush()
                if seq.matcher.matched is not None:
                    finish = "stop"
        logprobs = [logprob] if seq.request.sampling.logprobs is not None and logprob is not None else None
        self._emit(seq, text, [token], logprobs, finish)

    def _emit(self, seq: _Sequence, text: str, token_ids: list[int], logprobs: list[TokenLogprob] | None, finish: str | None) -> None:
        if finish is not None:
            seq.timings.finished = time.monotonic()
            self._release(seq)
        output = GenerationOutput(
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=finish,
            num_prompt_tokens=seq.num_prompt,
            num_generated_tokens=seq.num_generated,
            prompt_logprobs=None if seq.sent_first else seq.prompt_lps,
            timings=seq.timings if finish is not None else None,
        )
        seq.sent_first = True
        seq.handle._put(output)

    def _collect_prompt_logprobs(self, seq: _Sequence, logits: torch.Tensor, n: int) -> None:
        """logits[t] of this chunk predicts the prompt token after it (the last one may predict nothing)."""
        start = seq.num_cached
        next_ids = seq.request.prompt_ids[start + 1 : start + n + 1]
        assert seq.prompt_lps is not None
        seq.prompt_lps.extend(prompt_logprobs(logits[: len(next_ids)], next_ids, seq.request.sampling.logprobs or 0))

    def _finish_without_tokens(self, seq: _Sequence) -> None:
        """max_tokens=0: the prompt (and its logprobs) is all there is."""
        self._emit(seq, "", [], [] if seq.request.sampling.logprobs is not None else None, "length")

    def _release(self, seq: _Sequence) -> None:
        if self._running.get(seq.slot) is seq:
            del self._running[seq.slot]
            heapq.heappush(self._free, seq.slot)

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        log.warning("request %s failed: %r", seq.handle.request_id, error)
        failure = RequestFailed(f"request failed: {error!r}")
        failure.__cause__ = error
        seq.handle._put(failure)

    def _abort_all(self) -> None:
        """Drain timed out: end every request with what it has, finish_reason "length"."""
        self._abort = False
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in list(self._running.values()) + waiting:
            text = seq.matcher.push(seq.detokenizer.flush()) + seq.matcher.flush()
            self._emit(seq, text, [], [] if seq.request.sampling.logprobs is not None else None, "length")

    def _fail_all(self, error: RequestFailed) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        running, self._running = list(self._running.values()), {}
        self._free = list(range(self.max_batch_size))
        for seq in running + waiting:
            seq.handle._put(error)
