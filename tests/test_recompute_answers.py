"""Idle work (app/engine/idle_work.py): while nothing else runs, a finished answer is recomputed with the
prefill kernels, so that the exact prefix cache offers a chat's whole history to its next turn. It must
change no bit of any output, count in no usage, and give way to any client request."""

from __future__ import annotations

import threading
import time

from app.engine import Engine, GenerationOutput, GenerationRequest, RequestStatus
from app.engine.idle_work import InternalHandle
from app.engine.prefix_cache import PrefixCache, SlotContent
from app.engine.scheduler import IDLE_GRACE_S, Scheduler
from model.invariance import make_batch_invariant
from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer
from tests.support.engine import collect, run
from tests.support.models import tiny_model
from tests.test_prefix_cache import waiting_request


def invariant_engine(prefix_cache: bool, recompute_answers: bool) -> Engine:
    model = tiny_model(max_batch_size=2, max_seq_len=256)
    make_batch_invariant(model)
    model.setup_cache(2, 256, batch_invariant=True)
    engine = Engine(
        model,
        ByteTokenizer(),
        max_batch_size=2,
        max_seq_len=256,
        prefill_chunk=256,  # one chunk per prompt: reuse may end anywhere 16 rows (dense_from) before its end
        prefix_cache=prefix_cache,
        recompute_answers=recompute_answers,
    )
    engine.start()
    return engine


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Until the engine has nothing left to do, its own work included (a user reading the answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine._cond:
            if not engine.scheduler.has_work() and not engine.scheduler.idle_work:
                return
        time.sleep(0.005)
    raise AssertionError("the engine did not go idle")


def chat(engine: Engine, turns: int = 4) -> list[tuple[list[int], list[float], int, int]]:
    """Each turn resends the history and its answer plus a new message, after the engine went idle:
    (answer ids, logprobs, cached prompt tokens, prompt length) per turn."""

    async def talk() -> list[tuple[list[int], list[float], int, int]]:
        history = [(11 * j) % 256 for j in range(40)]
        results = []
        for turn in range(turns):
            history = history + [(5 * turn + 3 * j) % 256 for j in range(16 + 7 * turn)]
            request = GenerationRequest(
                list(history), sampling=SamplingParams(temperature=0, logprobs=2), max_tokens=12, ignore_eos=True
            )
            outputs: list[GenerationOutput] = await collect(engine.submit(request))
            ids = [t for o in outputs for t in o.token_ids]
            logprobs = [lp.logprob for o in outputs for lp in (o.logprobs or [])]
            results.append((ids, logprobs, outputs[-1].num_cached_tokens, len(history)))
            history = history + ids
            wait_idle(engine)
        return results

    try:
        return run(talk())
    finally:
        engine.shutdown()


def test_a_chat_turn_reuses_the_previous_answer_with_the_same_bits_and_no_extra_usage() -> None:
    cold = chat(invariant_engine(prefix_cache=False, recompute_answers=False))
    plain_engine = invariant_engine(prefix_cache=True, recompute_answers=False)
    plain = chat(plain_engine)
    engine = invariant_engine(prefix_cache=True, recompute_answers=True)
    warm = chat(engine)
    for turn, (a, b, c) in enumerate(zip(cold, plain, warm)):
        assert a[:2] == b[:2] == c[:2], f"turn {turn}: outputs differ"
    for turn in range(1, len(warm)):
        previous_prompt, answer = warm[turn - 1][3], len(warm[turn - 1][0])
        # Without the recompute the previous prompt is reused at most; with it, the answer too.
        assert plain[turn][2] <= previous_prompt < previous_prompt + answer - 1 <= warm[turn][2], (turn, plain, warm)
    # Usage and the prefix-cache queries count client prompts only.
    assert engine.stats().prompt_tokens_total == plain_engine.stats().prompt_tokens_total - sum(
        w[2] - p[2] for w, p in zip(warm, plain)
    )
    assert engine.stats().prefix_cache_queries == plain_engine.stats().prefix_cache_queries


def test_idle_work_runs_only_when_nothing_else_does_and_gives_way_to_a_client() -> None:
    cache = PrefixCache(2, chunk=512, exact=True, rows_independent=True)
    cache.slots[0] = SlotContent(tokens=[1] * 20, last_used=1.0)
    sched = Scheduler(2, 512, 8, threading.Condition(), cache, share_prefixes=True)
    work = waiting_request(0, [1] * 20 + [2] * 20)
    work.handle = InternalHandle("recompute-r0")  # type: ignore[assignment]
    work.idle_work, work.expected_reuse = True, 20
    client = waiting_request(1, [7] * 10)
    client.status, client.slot = RequestStatus.DECODING, 1
    sched.running[1] = client
    sched.free.remove(1)
    sched.add_idle_work(work)
    assert sched.schedule().admitted == []  # a client request runs: the work waits
    sched.release(client)
    assert sched.schedule().admitted == [] and 0 < sched.idle_work_wait() <= IDLE_GRACE_S  # and a moment longer
    sched.last_client_work -= IDLE_GRACE_S  # nothing from clients since
    assert sched.has_work() and sched.idle_work_wait() == 0
    plan = sched.schedule()
    assert plan.admitted == [work] and (work.slot, work.num_cached) == (0, 20)
    assert [(c.start, c.length) for c in plan.prefill] == [(20, 20)]
    assert cache.stats.queries == 0  # the engine's own work is no query
    arriving = waiting_request(2, [9] * 8)
    sched.add(arriving)
    plan = sched.schedule()
    assert plan.cancelled == [work] and work.status is RequestStatus.CANCELLED and arriving in plan.admitted
    assert 0 not in sched.running or sched.running[0] is arriving

    # Work whose slot went to a client meanwhile is dropped: the prompt it would extend is gone.
    stale = waiting_request(3, [5] * 20 + [6] * 20)
    stale.handle = InternalHandle("recompute-r3")  # type: ignore[assignment]
    stale.idle_work, stale.expected_reuse = True, 20
    sched.add_idle_work(stale)
    sched.release(arriving)
    sched.last_client_work -= IDLE_GRACE_S
    assert sched.schedule().admitted == [] and not sched.idle_work and not sched.running
