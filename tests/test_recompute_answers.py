"""Idle work (app/engine/idle_work.py): while nothing else runs, a finished answer is recomputed with the
prefill kernels, so that the exact prefix cache offers a chat's whole history to its next turn. It must
change no bit of any output, count in no usage, and give way to any client request."""

from __future__ import annotations

import threading
import time

from app.engine import Engine, RequestStatus
from app.engine.idle_work import InternalHandle
from app.engine.prefix_cache import PrefixCache, SlotContent
from app.engine.scheduler import IDLE_GRACE_S, Scheduler
from tests.test_prefix_cache import Turn, conversation, invariant_engine, waiting_request


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Until the engine has nothing left to do, its own work included (a user reading the answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine._cond:
            if not engine.scheduler.has_work() and not engine.scheduler.idle_work:
                return
        time.sleep(0.005)
    raise AssertionError("the engine did not go idle")


def chat(prefix_cache: bool, recompute_answers: bool) -> tuple[Engine, list[Turn]]:
    """4 turns, each sent once the engine went idle; one 256-token chunk per prompt, so reuse may end
    anywhere 16 rows (dense_from) before the prompt's end, and every new message is at least that long."""
    engine = invariant_engine(prefix_cache, chunk=256, recompute_answers=recompute_answers)
    return engine, conversation(engine, first_message=16, after_answer=lambda: wait_idle(engine))


def test_a_chat_turn_reuses_the_previous_answer_with_the_same_bits_and_no_extra_usage() -> None:
    _, cold = chat(prefix_cache=False, recompute_answers=False)
    plain_engine, plain = chat(prefix_cache=True, recompute_answers=False)
    engine, warm = chat(prefix_cache=True, recompute_answers=True)
    for turn, (a, b, c) in enumerate(zip(cold, plain, warm)):
        assert a[:2] == b[:2] == c[:2], f"turn {turn}: outputs differ"
    cache = engine.prefix_cache
    for turn in range(1, len(warm)):
        previous = warm[turn - 1][3] + warm[turn - 1][0]  # the last prompt and its answer
        # With the recompute the slot holds the answer too: the next turn reuses what the cache's rules allow of it.
        assert warm[turn][2] == cache.reusable(previous, warm[turn][3]), turn
        assert plain[turn][2] <= len(warm[turn - 1][3])  # without it, at most the last prompt
        if cache.reuses_within_chunks:  # checked on this machine at start: then all of it but the last token
            assert warm[turn][2] >= len(previous) - 1 > plain[turn][2], (turn, warm[turn][2], plain[turn][2])
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
