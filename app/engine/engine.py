"""The engine: one thread owns the model and its KV cache and runs continuous batching over slots.

Its heartbeat is `step()`: the scheduler plans (slots, prefill chunks, decode rows), the model runner
runs the plan (the forward passes and the sampler), and postprocessing turns the sampled tokens into
outputs (text, stops, finish reasons) that go to each request's handle.

Threads. `submit` runs on the asyncio event loop: it validates, queues, and returns a RequestHandle
at once. The engine thread sleeps on a Condition while there is no work (it never spins).

Prefill chunk size. Measured on SmolLM2-135M, 2 CPU cores, int4 weights (docs/performance.md): a
512-token chunk (the default) takes ~310 ms, about 3 batch-32 decode steps; against 256 it raised
32-client throughput from 278 to ~292 tok/s and cut TTFT p50 from 1.45 to ~1.05 s, while 1024 was no
faster. In float32 a 512-token chunk takes ~510 ms. Lower it for smoother streams, raise it for a
faster first token on long prompts.

Failure. An exception while handling one request (admission, its tokens) fails that request only:
its iterator raises RequestFailed. An exception in the batched forward or sampling kills the loop:
stats().healthy turns False, submit raises EngineOverloaded, and every pending handle gets
RequestFailed instead of hanging.

Drain: submit raises EngineDraining (an EngineOverloaded); running and waiting requests may finish
until the timeout; those still unfinished then end with a final output (the text so far flushed,
finish_reason "abort") so that clients see a well-formed end and can tell it from max_tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from app.engine.handle import END, OutputQueue, RequestHandle
from app.engine.idle_work import answer_recompute
from app.engine.model_runner import CausalLM, ModelRunner, StepResult
from app.engine.output_processor import OutputProcessor
from app.engine.prefix_cache import PrefixCache
from app.engine.request import (
    EngineDraining,
    EngineOverloaded,
    GenerationRequest,
    Request,
    RequestFailed,
    RequestStatus,
    RequestTimings,
    check_request,
    stop_ids_of,
)
from app.engine.scheduler import Scheduler, StepPlan
from app.engine.telemetry import EngineTelemetry
from app.stop import StopMatcher
from model.memory import trim_free_memory
from model.sampling import Sampler
from model.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


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
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which reused


class Engine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int,
        max_seq_len: int,
        max_queue: int = 256,
        prefill_chunk: int = 512,
        prefix_cache: bool = True,
        recompute_answers: bool = False,
    ) -> None:
        if max_batch_size < 1 or max_batch_size > model.max_batch_size:
            raise ValueError(f"max_batch_size {max_batch_size} must be in 1..{model.max_batch_size} (the model's cache)")
        if max_seq_len < 1 or max_seq_len > model.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} must be in 1..{model.max_seq_len} (the model's cache)")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.vocab_size = model.vocab_size
        self._cond = threading.Condition()  # guards the waiting queue and the flags below
        # Exact reuse (no generated tokens, chunk rules) for a batch-invariant model: the same bits as without
        # the cache. Whether prefill rows are independent of their chunk is checked when the engine starts.
        self.prefix_cache = PrefixCache(
            max_batch_size, prefill_chunk, enabled=prefix_cache, exact=bool(getattr(model, "batch_invariant", False))
        )
        self.scheduler = Scheduler(
            max_batch_size,
            prefill_chunk,
            max_queue,
            self._cond,
            self.prefix_cache,
            share_prefixes=hasattr(model, "copy_prefix"),
            decode_window=getattr(model, "decode_window", None),
        )
        self.runner = ModelRunner(model, max_batch_size)
        self.output_processor = OutputProcessor(max_seq_len)
        self.recompute_answers = recompute_answers  # app/engine/idle_work.py
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._end_all = False  # a drain timed out
        self._healthy = True
        self._accepting = True
        self._prompt_tokens_total = 0
        self._generated_tokens_total = 0
        self._steps = 0
        self._last_step_duration = 0.0
        self._last_step_time: float | None = None
        self.step_batch_sizes: list[int] = []  # running count per step, kept short (tests/diagnostics)
        self.telemetry = EngineTelemetry()  # the last minute of steps, for the playground's engine panel

    @property
    def model(self) -> CausalLM:
        return self.runner.model

    @model.setter
    def model(self, model: CausalLM) -> None:  # tests wrap the forward pass
        self.runner.model = model

    @property
    def sampler(self) -> Sampler | None:
        """Built on the engine thread when it starts."""
        return self.runner.sampler

    @property
    def _waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    # ------------------------------------------------------------------ event loop side

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llamaserve-engine", daemon=True)
            self._thread.start()

    def validate(self, request: GenerationRequest) -> None:
        """Raise ContextLengthExceeded / InvalidRequest for a request this engine cannot run."""
        check_request(request, self.vocab_size, self.max_seq_len)

    def submit(
        self,
        request: GenerationRequest,
        *,
        request_id: str | None = None,
        queue: OutputQueue | None = None,
        group: str | None = None,
    ) -> RequestHandle:
        """Validate and queue; call from the event loop. Raises at once instead of queueing too much.

        `request_id` names it in logs (the API passes its response id); `queue` lets several handles
        share one output queue (app/streaming.py reads it); requests of one `group` (the choices of one
        API request) take turns for slots with other groups.
        """
        self.validate(request)
        loop = asyncio.get_running_loop()
        with self._cond:
            if not self._healthy:
                raise EngineOverloaded("the engine is not running")
            if not self._accepting:
                raise EngineDraining("the server is shutting down")
            order = next(self._ids)
            handle = RequestHandle(request_id or f"req-{order}", self, loop, queue)
            self.scheduler.add(self._new_request(handle, request, order, group or handle.request_id))
            self._cond.notify()
        return handle

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let work finish for up to `timeout` s, then end what is left ("abort")."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self._busy() and self._healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not self._busy() or not self._healthy:
            return
        with self._cond:
            self._end_all = True
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
            running = sum(not r.idle_work for r in self.scheduler.running.values())
            waiting = len(self.scheduler.waiting)
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
            prefix_cache_queries=self.prefix_cache.stats.queries,
            prefix_cache_hits=self.prefix_cache.stats.hits,
        )

    def slots_snapshot(self) -> dict[str, object]:
        """Each slot: the request in it (id, status, tokens in its cache) or the prefix it keeps (/slots)."""
        with self._cond:
            running = dict(self.scheduler.running)
        slots = self.prefix_cache.snapshot()
        for entry in slots:
            request = running.get(entry["slot"])
            entry["request"] = None
            entry["state"] = "free" if request is None else request.status.value  # prefilling or decoding
            if request is not None:
                entry["request"] = {
                    "id": request.request_id,
                    "status": request.status.value,
                    "prompt_tokens": request.num_prompt,
                    "cached_prompt_tokens": request.num_cached_prompt,
                    "generated_tokens": request.num_generated,
                    "max_tokens": request.params.max_tokens,
                    "tokens_in_cache": request.num_cached,
                }
        cache = self.prefix_cache
        return {
            "prefix_cache": {
                "enabled": cache.enabled,
                "exact": cache.exact,
                "reuse_within_chunks": cache.reuses_within_chunks,
                "queries": cache.stats.queries,
                "hits": cache.stats.hits,
            },
            "slots": slots,
        }

    def wake(self) -> None:
        """Something changed (a cancel): let the engine thread look."""
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------------ engine thread

    def step(self) -> None:
        """One heartbeat: schedule, run, postprocess."""
        start = time.monotonic()
        with self._cond:
            end_all, self._end_all = self._end_all, False
        plan = self.scheduler.schedule(end_all)
        self.step_batch_sizes.append(len(self.scheduler.running))
        del self.step_batch_sizes[:-1000]
        first = self.runner.run_prefill(plan) if plan.admitted or plan.prefill or plan.copies else StepResult()
        prefilled = self._postprocess(plan, first)  # first tokens go out now, not after the decode forward
        decoded = self.runner.run_decode(plan)
        self._deliver(decoded)
        self._steps += 1
        self._last_step_time = time.monotonic()
        self._last_step_duration = self._last_step_time - start
        sampled = len(first.sampled) + len(decoded.sampled)
        self.telemetry.record_step(self._last_step_time, self._last_step_duration, sampled, prefilled)

    def _postprocess(self, plan: StepPlan, result: StepResult) -> int:
        """Send every request what the plan and the step's first half produced; finished and failed requests
        give back their slots. Returns the prompt tokens read into the cache this step."""
        for chunk in plan.prefill:  # what the slots now hold, for the prefix cache (before failures clear a slot)
            self.prefix_cache.computed(chunk.request.slot, chunk.request.tokens, chunk.start, chunk.length)
        for request in plan.cancelled:
            request.handle.put(END)
        for request in plan.ended:
            request.handle.put(self.output_processor.end(request, "abort"))
        for request in plan.no_compute + result.prompt_done:
            self.scheduler.release(request)
            request.handle.put(self.output_processor.end(request, "length"))
        for request, error in result.failed:
            self._fail(request, error)
        failed = {id(request) for request, _ in result.failed}  # their chunks were planned but never read
        read = [chunk for chunk in plan.prefill if id(chunk.request) not in failed]
        prefilled = sum(chunk.length for chunk in read)
        self._prompt_tokens_total += sum(chunk.length for chunk in read if not chunk.request.idle_work)  # clients' only
        self._deliver(result)
        return prefilled

    def _deliver(self, result: StepResult) -> None:
        """Each sampled token to its request's output; a finished request gives back its slot."""
        for sampled in result.sampled:
            request = sampled.request
            first = request.timings.first_token is None
            try:
                output = self.output_processor.accept(request, sampled.token_id, sampled.logprob)
            except Exception as e:  # noqa: BLE001 - a failure in one request's output fails that request only
                self._fail(request, e)
                continue
            self._generated_tokens_total += 1
            if first and request.timings.first_token is not None:
                self.telemetry.record_first_token(
                    request.timings.first_token, request.timings.first_token - request.timings.arrival
                )
            if output.finish_reason is not None:
                self.scheduler.release(request)
                if self.recompute_answers and self._accepting and output.finish_reason in ("stop", "length"):
                    work = answer_recompute(request, self.prefix_cache, self.tokenizer, self.max_seq_len, next(self._ids))
                    if work is not None:
                        self.scheduler.add_idle_work(work)
            request.handle.put(output)

    def _new_request(self, handle: RequestHandle, params: GenerationRequest, order: int, group: str) -> Request:
        return Request(
            handle=handle,
            params=params,
            stop_ids=stop_ids_of(params, self.tokenizer),
            detokenizer=IncrementalDetokenizer(self.tokenizer),
            matcher=StopMatcher(params.stop),
            timings=RequestTimings(arrival=time.monotonic()),
            order=order,
            group=group,
            tokens=list(params.prompt_ids),
            prompt_logprobs=[None] if params.prompt_logprobs else None,
        )

    def _busy(self) -> bool:
        with self._cond:
            return self.scheduler.has_client_work()

    def _run(self) -> None:
        try:
            self.runner.start()
            self.runner.check_prefill_rows(self.prefix_cache)
            with torch.inference_mode():
                worked = False  # since the heap was last trimmed
                while True:
                    with self._cond:
                        idle = not self._stopping and not self.scheduler.has_work()
                    if idle and worked:  # out of work: hand freed heap pages back (model/memory.py)
                        trim_free_memory()
                        worked = False
                    with self._cond:
                        while not self._stopping and not self.scheduler.has_work():
                            self._cond.wait(self.scheduler.idle_work_wait())  # wakes for idle work, if any
                        if self._stopping:
                            break
                    self.step()
                    worked = True
        except BaseException as e:  # the loop itself failed: nothing may hang on it
            log.exception("engine loop died")
            with self._cond:
                self._healthy = False
                self._accepting = False
            self._fail_all(RequestFailed(f"the engine failed: {e!r}"))
            return
        self._fail_all(RequestFailed("the engine was shut down"))

    def _fail(self, request: Request, error: BaseException) -> None:
        self.scheduler.release(request, failed=True)
        request.status = RequestStatus.FAILED
        log.warning("request %s failed: %r", request.request_id, error)
        failure = RequestFailed(f"request failed: {error!r}")
        failure.__cause__ = error
        request.handle.put(failure)

    def _fail_all(self, error: RequestFailed) -> None:
        for request in self.scheduler.take_everything():
            request.status = RequestStatus.FAILED
            request.handle.put(error)
