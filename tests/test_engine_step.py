"""The engine's step, piece by piece: the scheduler's plans, request status, and text offsets."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from app.engine import (
    ContextLengthExceeded,
    Engine,
    GenerationRequest,
    RequestStatus,
)
from app.engine.request import Request, RequestTimings
from app.engine.scheduler import Scheduler
from app.stop import StopMatcher
from model.tokenizer import ByteTokenizer, IncrementalDetokenizer
from tests.support.engine import GREEDY
from tests.support.models import tiny_model


class FakeHandle:
    def __init__(self, name: str) -> None:
        self.request_id, self.cancelled = name, False


def request(order: int, prompt_len: int, max_tokens: int = 4, **kwargs: Any) -> Request:
    params = GenerationRequest(prompt_ids=list(range(1, prompt_len + 1)), max_tokens=max_tokens, **kwargs)
    tokenizer = ByteTokenizer()
    return Request(
        handle=FakeHandle(f"r{order}"),  # type: ignore[arg-type]
        params=params,
        stop_ids=frozenset(),
        detokenizer=IncrementalDetokenizer(tokenizer),
        matcher=StopMatcher([]),
        timings=RequestTimings(arrival=0.0),
        order=order,
        tokens=list(params.prompt_ids),
        prompt_logprobs=[None] if params.prompt_logprobs else None,
    )


def scheduler(slots: int = 2, chunk: int = 8, queue: int = 16) -> Scheduler:
    return Scheduler(slots, chunk, queue, threading.Condition())


def test_admission_takes_the_lowest_free_slots_and_marks_requests_prefilling() -> None:
    s = scheduler(slots=2)
    reqs = [request(i, 3) for i in range(3)]
    for r in reqs:
        s.add(r)
    plan = s.schedule()
    assert plan.admitted == reqs[:2] and [r.slot for r in reqs[:2]] == [0, 1]
    assert [r.status for r in reqs] == [RequestStatus.PREFILLING, RequestStatus.PREFILLING, RequestStatus.WAITING]
    assert list(s.waiting) == [reqs[2]] and plan.decode == []


def test_prefill_budget_is_whole_chunks_cut_from_each_prompts_start() -> None:
    s = scheduler(slots=3, chunk=8)
    long, short, other = request(0, 20), request(1, 3), request(2, 6)
    for r in (long, short, other):
        s.add(r)
    plan = s.schedule()
    assert [(c.request, c.start, c.length) for c in plan.prefill] == [(long, 0, 8)]  # the budget is spent
    long.cached(8)
    plan = s.schedule()
    assert [(c.request, c.start, c.length) for c in plan.prefill] == [(long, 8, 8)]
    long.cached(8)
    plan = s.schedule()  # 4 left of the long prompt, then the short one fits the budget, the 6 does not
    assert [(c.request, c.start, c.length, c.last) for c in plan.prefill] == [(long, 16, 4, True), (short, 0, 3, True)]


def test_prompt_done_means_decoding_and_decode_rows_are_in_slot_order() -> None:
    s = scheduler(slots=2, chunk=8)
    a, b = request(0, 2), request(1, 2)
    s.add(a)
    s.add(b)
    s.schedule()
    b.cached(2)
    a.cached(2)
    assert a.status is b.status is RequestStatus.DECODING
    plan = s.schedule()
    assert plan.decode == [a, b] and plan.prefill == []


def test_cancelled_requests_leave_running_and_waiting_and_free_their_slot() -> None:
    s = scheduler(slots=1)
    running, waiting = request(0, 2), request(1, 2)
    s.add(running)
    s.add(waiting)
    s.schedule()
    running.handle.cancelled = waiting.handle.cancelled = True
    plan = s.schedule()
    assert plan.cancelled == [running, waiting] and not s.running and not s.waiting and s.free == [0]
    assert running.status is waiting.status is RequestStatus.CANCELLED


def test_max_tokens_zero_without_logprobs_needs_no_slot() -> None:
    s = scheduler(slots=1)
    busy, empty = request(0, 2), request(1, 2, max_tokens=0)
    s.add(busy)
    s.add(empty)
    plan = s.schedule()
    assert plan.admitted == [busy] and plan.no_compute == [empty] and empty.slot == -1


def test_end_all_ends_every_request_and_frees_the_slots() -> None:
    s = scheduler(slots=1)
    reqs = [request(0, 2), request(1, 2)]
    for r in reqs:
        s.add(r)
    s.schedule()
    plan = s.schedule(end_all=True)
    assert plan.ended == reqs and not plan.runs_model and not s.running and not s.waiting and s.free == [0]


def test_engine_request_status_runs_waiting_to_finished_and_offsets_count_the_sent_text() -> None:
    """Offsets are character positions in the text the request sends, with multi-byte characters split
    across byte tokens (ByteTokenizer: one token per byte)."""
    model = tiny_model(2, 64)
    engine = Engine(model, ByteTokenizer(), max_batch_size=2, max_seq_len=64)
    seen: list[RequestStatus] = []

    async def main() -> list[Any]:
        handle = engine.submit(GenerationRequest([72, 105], GREEDY, max_tokens=12, ignore_eos=True), request_id="cmpl-x")
        state = engine._waiting[0]
        seen.append(state.status)
        engine.start()
        outs = [out async for out in handle]
        seen.append(state.status)
        return outs

    outs = asyncio.run(asyncio.wait_for(main(), 60))
    engine.shutdown()
    assert seen == [RequestStatus.WAITING, RequestStatus.FINISHED]
    assert sum(len(o.text_offsets) for o in outs) == 12
    sent = 0
    for out in outs:  # each token's offset is where the text sent before it ends
        assert out.text_offsets == [sent]
        sent += len(out.text)


def test_submit_names_the_request_and_validation_happens_before_queueing() -> None:
    engine = Engine(tiny_model(1, 64), ByteTokenizer(), max_batch_size=1, max_seq_len=64)

    async def main() -> str:
        with pytest.raises(ContextLengthExceeded):
            engine.submit(GenerationRequest([1, 2], GREEDY, max_tokens=100))
        assert not engine._waiting
        return engine.submit(GenerationRequest([1, 2], GREEDY, max_tokens=2), request_id="chatcmpl-abc").request_id

    assert asyncio.run(main()) == "chatcmpl-abc"
    engine.shutdown()


def test_the_engine_trims_the_heap_when_it_runs_out_of_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freed memory goes back to the OS once the engine is idle, not after every step (model/memory.py)."""
    import app.engine.engine as engine_module

    engine = Engine(tiny_model(2, 64), ByteTokenizer(), max_batch_size=2, max_seq_len=64)
    trims: list[int] = []  # the step count at each trim

    def trim() -> bool:
        trims.append(engine.stats().steps)
        return True

    monkeypatch.setattr(engine_module, "trim_free_memory", trim)

    async def main() -> None:
        engine.start()
        for round_ in range(2):
            handle = engine.submit(GenerationRequest([72, 105], GREEDY, max_tokens=5, ignore_eos=True))
            assert len([out async for out in handle]) == 5
            for _ in range(1000):  # the trim runs on the engine thread right after its last step
                if len(trims) > round_:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(main(), 60))
    engine.shutdown()
    assert len(trims) == 2, "one trim per idle spell"
    assert trims[0] >= 5 and trims[1] >= trims[0] + 5, "trimmed after the work, not between its steps"
