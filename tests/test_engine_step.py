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


@pytest.mark.parametrize("independent", [False, True])
def test_a_cached_prompts_rest_crosses_a_chunk_boundary_in_one_chunk_where_rows_are_independent(independent: bool) -> None:
    from app.engine.prefix_cache import PrefixCache

    cache = PrefixCache(2, chunk=64, rows_independent=independent)
    s = Scheduler(2, 64, 16, threading.Condition(), cache)
    crossing, short_tail = request(0, 64 + 20), request(1, 64 + 10)
    for r in (crossing, short_tail):
        r.num_cached = 50  # what the cache gave them (admission would set it)
        s.add(r)
    s.schedule()
    for r in (crossing, short_tail):
        r.num_cached = 50
    chunks = [(c.request, c.start, c.length) for c in s._prefill_chunks([])]
    # 20 tokens past the boundary run dense in a cold prefill too; 10 would not (other kernels): cut there.
    assert chunks == ([(crossing, 50, 34), (short_tail, 50, 14)] if independent else [(crossing, 50, 14), (short_tail, 50, 14)])


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


# ---------------------------------------------------------------- the step's two halves, packed prefill


class GatedDecode:
    """The tiny model, whose first decode forward after a prefill of `gate_width` tokens waits for `release`:
    the decode forward of the step that read that prompt, run after its first token was sampled."""

    def __init__(self, model: Any, gate_width: int) -> None:
        self.model = model
        self.max_batch_size, self.max_seq_len = model.max_batch_size, model.max_seq_len
        self.vocab_size, self.device = model.vocab_size, model.device
        self.gate_width = gate_width
        self.release = threading.Event()
        self.armed = False
        self.waited = False

    def __call__(self, tokens: Any, positions: Any, slots: Any = None, **kwargs: Any) -> Any:
        if tokens.shape[1] == self.gate_width:
            self.armed = True
        elif tokens.shape[1] == 1 and self.armed:
            self.armed = False
            self.waited = self.release.wait(timeout=20)
        return self.model(tokens, positions, slots, **kwargs)


def test_a_new_request_gets_its_first_token_before_the_running_rows_decode() -> None:
    """The first token of a prompt read this step is sent before the step's decode forward runs: time to
    first token does not include the running streams' decode (app/engine/model_runner.py)."""
    gated = GatedDecode(tiny_model(2, 128), gate_width=20)
    engine = Engine(gated, ByteTokenizer(), max_batch_size=2, max_seq_len=128)  # type: ignore[arg-type]

    async def main() -> None:
        engine.start()
        running = engine.submit(GenerationRequest([72, 105, 33] * 5, GREEDY, max_tokens=60, ignore_eos=True))
        running_outputs = aiter(running)
        await anext(running_outputs)
        new = engine.submit(GenerationRequest([65, 66, 67, 68] * 5, GREEDY, max_tokens=3, ignore_eos=True))
        new_outputs = aiter(new)
        first = await asyncio.wait_for(anext(new_outputs), 10)  # while that step's decode forward is held
        assert first.token_ids and not gated.waited
        gated.release.set()
        assert len([o async for o in new_outputs]) == 2
        running.cancel()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        gated.release.set()
        engine.shutdown()
    assert gated.waited, "the held decode forward went on once released"


def chunk(length: int, start: int = 0, prompt_logprobs: bool = False) -> Any:
    from app.engine.scheduler import PrefillChunk

    r = request(length, start + length, prompt_logprobs=prompt_logprobs)
    return PrefillChunk(r, start, length)


def test_prefill_chunks_pack_by_length_and_short_or_echoing_ones_run_alone() -> None:
    from app.engine.model_runner import PACK_SLACK, ModelRunner

    runner = ModelRunner(tiny_model(4, 128), 4)
    chunks = [chunk(100), chunk(8), chunk(100 - PACK_SLACK), chunk(30), chunk(40, prompt_logprobs=True), chunk(20, start=5)]
    assert runner._packs(chunks) == [[c] for c in chunks], "no packing until the engine has checked the rows"
    runner.pack_prefill = True
    packs = [[c.length for c in pack] for pack in runner._packs(chunks)]
    # longest first; 36 is PACK_SLACK shorter than 100 and joins it; 8 (< PREFILL_PAD_FROM) and echo run alone
    assert packs == [[100, 100 - PACK_SLACK], [30, 20], [8], [40]]
