"""Prefix caching (issue 13): a request reuses the keys a finished request left in its slot, and with a
batch-invariant model its outputs are the same bits as without the cache."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from typing import Any, Callable

from app.engine import Engine, GenerationOutput, GenerationRequest, RequestStatus
from app.engine.prefix_cache import PrefixCache, SlotContent, common_prefix
from app.engine.request import Request, RequestTimings
from app.engine.scheduler import PrefixCopy, Scheduler
from app.stop import StopMatcher
from model.checkpoint import load_model
from model.invariance import make_batch_invariant
from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer, IncrementalDetokenizer
from tests.support.engine import collect, run
from tests.support.models import tiny_model

# ---------------------------------------------------------------- the reuse rules


def test_common_prefix_matches_an_element_wise_scan() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
        b = a[: rng.randrange(0, len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 10))]
        expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == expected == common_prefix(b, a)


def test_the_last_prompt_token_is_always_recomputed() -> None:
    cache = PrefixCache(2, chunk=512, exact=False)
    assert cache.reusable([1, 2, 3, 4], [1, 2, 3]) == 2
    assert cache.reusable([1, 2, 9], [1, 2, 3, 4]) == 2
    assert cache.reusable([5], [1, 2]) == 0


def test_exact_reuse_stops_at_a_chunk_boundary_unless_prefill_rows_are_independent() -> None:
    held, prompt = list(range(100)), list(range(100)) + [7] * 50
    assert PrefixCache(1, chunk=32, rows_independent=False).reusable(held, prompt) == 96
    assert PrefixCache(1, chunk=32, rows_independent=True).reusable(held, prompt) == 100
    # The first recomputed chunk must be dense (>= 16 tokens), as the cold prefill's chunk there is.
    assert PrefixCache(1, chunk=32, rows_independent=True).reusable(held, list(range(100)) + [7] * 14) == 114 - 16
    # A cold prefill whose last chunk is short runs it on other kernels: reuse stops at its start.
    assert PrefixCache(1, chunk=32, rows_independent=True).reusable(held, list(range(100))) == 96


def test_exact_slots_offer_only_prompt_positions_of_dense_chunks() -> None:
    cache = PrefixCache(1, chunk=32, rows_independent=True)
    tokens = list(range(80))
    cache.start(0, tokens, 0)
    cache.computed(0, tokens, 0, 32)
    cache.computed(0, tokens, 32, 32)
    cache.computed(0, tokens, 64, 10)  # a short last chunk: other kernels
    cache.release(0, tokens + [1, 2, 3], num_cached=82)  # generated tokens: decode kernels
    assert cache.slots[0].tokens == tokens[:64]
    loose = PrefixCache(1, chunk=32, exact=False)
    loose.release(0, tokens + [1, 2, 3], num_cached=82)
    assert loose.slots[0].tokens == (tokens + [1, 2])
    loose.release(0, tokens, num_cached=80, failed=True)
    assert loose.slots[0].tokens == []


def test_admission_picks_the_longest_prefix_then_the_least_recently_used_slot() -> None:
    cache = PrefixCache(3, chunk=512, exact=False)
    cache.release(0, [1, 2, 3, 4, 5], 5)
    cache.release(1, [1, 2, 9], 3)
    cache.release(2, [8, 8], 2)
    assert cache.choose([0, 1, 2], [1, 2, 3, 4, 6]) == (0, 4)
    assert cache.choose([1, 2], [5, 5]) == (1, 0)  # a miss: slot 1 ended before slot 2
    assert cache.stats.queries == 7 and cache.stats.hits == 4
    off = PrefixCache(3, chunk=512, enabled=False, exact=False)
    off.release(0, [1, 2, 3], 3)
    assert off.choose([0, 1], [1, 2, 3, 4]) == (1, 0) and off.stats.queries == 0


def test_a_request_that_reuses_nothing_takes_the_lowest_free_slot_and_that_slots_content_moves() -> None:
    """Decoding rows on consecutive slots read their keys in place (model/static_step.py): a miss takes the
    lowest free slot, and what that slot held is copied into the one the cache gives up (least recently used)."""

    def loaded_cache(enabled: bool = True) -> PrefixCache:
        cache = PrefixCache(4, chunk=512, exact=False, enabled=enabled)
        for slot, last_used in ((0, 3.0), (1, 4.0), (2, 1.0), (3, 2.0)):  # slot 2 is the least recently used
            cache.slots[slot] = SlotContent(tokens=[10 + slot] * 5, last_used=last_used)
        return cache

    cache = loaded_cache()
    sched = Scheduler(4, 512, 8, threading.Condition(), cache, share_prefixes=True)
    miss = waiting_request(0, [99] * 6)
    sched.add(miss)
    plan = sched.schedule()
    assert miss.slot == 0 and plan.copies == [PrefixCopy(source=0, target=2, length=5)]
    assert cache.slots[2].tokens == [10] * 5 and cache.slots[2].last_used == 3.0 and cache.slots[0].tokens == []
    hit = waiting_request(1, [10] * 5 + [7])  # what slot 0 held is found where it moved
    sched.add(hit)
    plan = sched.schedule()
    assert hit.slot == 2 and hit.num_cached == 5 and plan.copies == []

    # Equals: slots 1 and 3 (free, 3 the least recently used) both offer the shared 4 tokens; slot 1 is
    # taken, and its content moves to 3, whose own the request would have overwritten.
    cache.slots[1] = SlotContent(tokens=[5, 5, 5, 5, 1, 1], last_used=9.0)
    cache.slots[3] = SlotContent(tokens=[5, 5, 5, 5, 3], last_used=8.0)
    tie = waiting_request(4, [5, 5, 5, 5, 2, 2])
    sched.add(tie)
    plan = sched.schedule()
    assert (tie.slot, tie.num_cached) == (1, 4) and plan.copies == [PrefixCopy(source=1, target=3, length=6)]
    assert cache.slots[3].tokens == [5, 5, 5, 5, 1, 1] and cache.slots[1].tokens == [5, 5, 5, 5]
    holder = Scheduler(4, 512, 8, threading.Condition(), loaded_cache(), share_prefixes=True)
    holder.add(longer := waiting_request(5, [12] * 4 + [6]))  # slot 2 offers more of it than the lowest free slot
    assert holder.schedule().copies == [] and (longer.slot, longer.num_cached) == (2, 4)

    cannot_copy = Scheduler(4, 512, 8, threading.Condition(), loaded_cache(), share_prefixes=False)
    cannot_copy.add(miss := waiting_request(2, [99] * 6))
    assert cannot_copy.schedule().copies == [] and miss.slot == 2  # the cache keeps slot 0's content
    off = Scheduler(4, 512, 8, threading.Condition(), loaded_cache(enabled=False), share_prefixes=True)
    off.add(miss := waiting_request(3, [99] * 6))
    assert off.schedule().copies == [] and miss.slot == 0  # nothing is offered: nothing to keep


def test_decoding_rows_spread_wider_than_the_model_reads_in_place_move_into_free_slots_between_them() -> None:
    """Requests ending leave the decode rows on slots 1, 6 and 7 of 8: three rows need a window of 4
    (model/static_step.py's buckets). The window holding the most rows is 4-7; slot 1's request moves into
    its lowest free slot with its keys and sampling state, and slot 1 still offers what it held."""

    def bucket(rows: int) -> int:
        return next(b for b in (1, 2, 4, 8) if b >= rows)

    cache = PrefixCache(8, chunk=512, exact=False)
    sched = Scheduler(8, 512, 8, threading.Condition(), cache, share_prefixes=True, decode_window=bucket)
    decoding = {}
    for slot, length in ((1, 9), (6, 4), (7, 5)):
        request = waiting_request(slot, [slot] * length)
        request.slot, request.status, request.num_cached = slot, RequestStatus.DECODING, length + 2
        cache.slots[slot] = SlotContent(tokens=[slot] * length)
        sched.running[slot] = decoding[slot] = request
        sched.free.remove(slot)
    plan = sched.schedule()
    assert plan.copies == [PrefixCopy(source=1, target=4, length=11, moves_request=True)]
    assert [r.slot for r in plan.decode] == [4, 6, 7] and decoding[1].slot == 4 and sched.running[4] is decoding[1]
    assert sorted(sched.free) == [0, 1, 2, 3, 5]
    assert cache.slots[4].tokens == [1] * 9 and cache.slots[1].tokens == [1] * 9  # its keys are still in slot 1 too
    assert sched.schedule().copies == []  # together now: nothing more moves

    # No window has room for every row: prefilling requests hold the slots between them.
    crowded = Scheduler(4, 512, 8, threading.Condition(), PrefixCache(4, chunk=512), share_prefixes=True, decode_window=bucket)
    decode, prefill = RequestStatus.DECODING, RequestStatus.PREFILLING
    for slot, status in ((0, decode), (1, prefill), (2, prefill), (3, decode)):
        request = waiting_request(slot, [slot] * 3)
        request.slot, request.status, request.num_cached = slot, status, 3
        crowded.running[slot] = request
        crowded.free.remove(slot)
    plan = crowded.schedule()
    assert [c for c in plan.copies if c.moves_request] == [] and [r.slot for r in plan.decode] == [0, 3]
    # A model that cannot copy between slots never moves a request.
    assert Scheduler(8, 512, 8, threading.Condition(), cache, share_prefixes=False, decode_window=bucket).decode_window is None


def waiting_request(order: int, prompt: list[int]) -> Request:
    handle = type("Handle", (), {"request_id": f"r{order}", "cancelled": False})()
    return Request(
        handle=handle,  # type: ignore[arg-type]
        params=GenerationRequest(prompt, max_tokens=2),
        stop_ids=frozenset(),
        detokenizer=IncrementalDetokenizer(ByteTokenizer()),
        matcher=StopMatcher([]),
        timings=RequestTimings(arrival=0.0),
        order=order,
        tokens=list(prompt),
    )


# ---------------------------------------------------------------- the engine: same bits, cache on or off


def invariant_engine(prefix_cache: bool, chunk: int = 32, slots: int = 2, recompute_answers: bool = False) -> Engine:
    model = tiny_model(max_batch_size=slots, max_seq_len=256)
    make_batch_invariant(model)
    model.setup_cache(slots, 256, batch_invariant=True)
    engine = Engine(
        model,
        ByteTokenizer(),
        max_batch_size=slots,
        max_seq_len=256,
        prefill_chunk=chunk,
        prefix_cache=prefix_cache,
        recompute_answers=recompute_answers,
    )
    engine.start()
    return engine


Turn = tuple[list[int], list[float], int, list[int]]  # answer ids, logprobs, cached prompt tokens, the prompt


def conversation(
    engine: Engine, turns: int = 4, first_message: int = 9, after_answer: Callable[[], None] | None = None
) -> list[Turn]:
    """Each turn resends the history (prompt + answer) plus a new message, `first_message` tokens long in the
    first turn and 7 more in each next one; `after_answer` runs before the next turn (a user reading)."""

    async def talk() -> list[Turn]:
        history: list[int] = [(11 * j) % 256 for j in range(40)]
        results = []
        for turn in range(turns):
            history = history + [(5 * turn + 3 * j) % 256 for j in range(first_message + 7 * turn)]
            sampling = SamplingParams(temperature=0, logprobs=2)
            outputs: list[GenerationOutput] = await collect(
                engine.submit(GenerationRequest(list(history), sampling=sampling, max_tokens=12, ignore_eos=True))
            )
            ids = [t for o in outputs for t in o.token_ids]
            logprobs = [lp.logprob for o in outputs for lp in (o.logprobs or [])]
            results.append((ids, logprobs, outputs[-1].num_cached_tokens, list(history)))
            history = history + ids
            if after_answer is not None:
                after_answer()
        return results

    try:
        return run(talk())
    finally:
        engine.shutdown()


def test_a_multi_turn_chat_gives_the_same_bits_with_the_cache_and_reuses_the_history() -> None:
    cold = conversation(invariant_engine(prefix_cache=False))
    warm = conversation(invariant_engine(prefix_cache=True))
    for turn, ((ids_a, lp_a, cached_a, _), (ids_b, lp_b, _cached, _)) in enumerate(zip(cold, warm)):
        assert ids_a == ids_b and lp_a == lp_b, f"turn {turn}"
        assert cached_a == 0
    assert warm[0][2] == 0 and all(cached > 0 for _, _, cached, _ in warm[1:]), [c for _, _, c, _ in warm]


def test_a_prefix_moved_out_of_the_way_by_a_miss_gives_the_same_bits_where_it_is_reused() -> None:
    """A runs in slot 0; B (a miss) takes slot 0 and A's keys move to slot 1; C continues A's prompt and
    reuses them there. Every token and logprob is the cache-off engine's."""
    a = [(13 * j + 5) % 256 for j in range(70)]
    prompts = [a, [(7 * j + 1) % 256 for j in range(50)], a + [(3 * j) % 256 for j in range(20)]]

    def serve(prefix_cache: bool) -> list[tuple[list[int], list[float], int, int]]:
        engine = invariant_engine(prefix_cache=prefix_cache, slots=3)

        async def one_by_one() -> list[tuple[list[int], list[float], int, int]]:
            results = []
            for prompt in prompts:
                handle = engine.submit(
                    GenerationRequest(prompt, sampling=SamplingParams(temperature=0, logprobs=2), max_tokens=6)
                )
                outputs: list[GenerationOutput] = await collect(handle)
                ids = [t for o in outputs for t in o.token_ids]
                logprobs = [lp.logprob for o in outputs for lp in (o.logprobs or [])]
                slots = engine.prefix_cache.snapshot()
                results.append((ids, logprobs, outputs[-1].num_cached_tokens, sum(s["cached_tokens"] > 0 for s in slots)))
            return results

        try:
            return run(one_by_one())
        finally:
            engine.shutdown()

    cold, warm = serve(False), serve(True)
    assert [(ids, lp) for ids, lp, _, _ in cold] == [(ids, lp) for ids, lp, _, _ in warm]
    # C reuses A's dense chunks (2 x 32 of 70 tokens) from where they moved; after B two slots hold prompts.
    assert [(cached, held) for _, _, cached, held in warm] == [(0, 1), (0, 2), (64, 2)]


def test_echo_with_prompt_logprobs_reuses_nothing_and_a_failed_slot_offers_nothing() -> None:
    engine = invariant_engine(prefix_cache=True)
    prompt = [(3 * j) % 256 for j in range(70)]

    async def go() -> tuple[list[GenerationOutput], list[GenerationOutput]]:
        first = await collect(engine.submit(GenerationRequest(prompt, max_tokens=2)))
        echo = await collect(engine.submit(GenerationRequest(prompt + [1], max_tokens=2, prompt_logprobs=True)))
        return first, echo

    try:
        _, echo = run(go())
    finally:
        engine.shutdown()
    assert echo[-1].num_cached_tokens == 0 and echo[0].prompt_logprobs is not None and len(echo[0].prompt_logprobs) == 71


# ---------------------------------------------------------------- the real model


def test_the_default_model_gives_the_same_logprobs_with_the_cache_on_a_shared_system_prompt(smollm2_path: Path) -> None:
    """int4 decode, bf16/fp32 dense prefill: whatever this CPU's kernels, the cache changes no bit."""
    loaded = load_model(smollm2_path, quantization="int4", max_batch_size=2, max_seq_len=512)
    tokenizer = loaded.tokenizer
    system = tokenizer.encode("You are a helpful assistant who answers in one short sentence. " * 6)
    questions = ["What is the capital of France?", "Name a colour of the sky.", "How many legs has a cat?"]

    def answers(prefix_cache: bool) -> list[tuple[list[int], list[float], int]]:
        engine = Engine(loaded.model, tokenizer, max_batch_size=2, max_seq_len=512, prefix_cache=prefix_cache)
        engine.start()

        async def ask() -> list[tuple[list[int], list[float], int]]:
            out: list[tuple[list[int], list[float], int]] = []
            for q in questions:
                sampling = SamplingParams(temperature=0, logprobs=1)
                request = GenerationRequest(system + tokenizer.encode(q), sampling=sampling, max_tokens=8, ignore_eos=True)
                outputs = await collect(engine.submit(request))
                out.append(
                    (
                        [t for o in outputs for t in o.token_ids],
                        [lp.logprob for o in outputs for lp in (o.logprobs or [])],
                        outputs[-1].num_cached_tokens,
                    )
                )
            return out

        try:
            return run(ask(), timeout=300)
        finally:
            engine.shutdown()

    cold, warm = answers(False), answers(True)
    assert [a[:2] for a in cold] == [a[:2] for a in warm]
    assert warm[0][2] == 0 and all(c > 0 for _, _, c in warm[1:]), [c for _, _, c in warm]


def test_the_slot_snapshot_shows_a_running_request_then_what_its_slot_keeps() -> None:
    engine = invariant_engine(prefix_cache=True)
    prompt = [(3 * j) % 256 for j in range(40)]

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        handle = engine.submit(GenerationRequest(prompt, max_tokens=50, ignore_eos=True), request_id="cmpl-x")
        async for _ in handle:
            during = engine.slots_snapshot()
            break
        await collect(handle)
        await asyncio.sleep(0.05)
        return during, engine.slots_snapshot()

    try:
        during, after = run(go())
    finally:
        engine.shutdown()
    [busy] = [s for s in during["slots"] if s["request"] is not None]
    assert busy["request"]["id"] == "cmpl-x" and busy["request"]["prompt_tokens"] == 40
    assert all(s["request"] is None for s in after["slots"])
    assert after["slots"][busy["slot"]]["cached_tokens"] > 0 and after["slots"][busy["slot"]]["idle_s"] is not None


def test_choices_sent_together_prefill_their_prompt_once_and_give_the_same_bits() -> None:
    prompt = [(5 * j + 1) % 256 for j in range(90)]

    def choices(prefix_cache: bool) -> tuple[list[tuple[list[int], list[float], int]], int]:
        engine = invariant_engine(prefix_cache, slots=4)

        async def go() -> list[tuple[list[int], list[float], int]]:
            sampling = SamplingParams(temperature=0, logprobs=1)
            handles = [
                engine.submit(GenerationRequest(prompt, sampling=sampling, max_tokens=6, ignore_eos=True), group="g")
                for _ in range(3)
            ]
            out = []
            for handle in handles:
                outputs = await collect(handle)
                lps = [lp.logprob for o in outputs for lp in (o.logprobs or [])]
                out.append(([t for o in outputs for t in o.token_ids], lps, outputs[-1].num_cached_tokens))
            return out

        try:
            return run(go()), engine.stats().prompt_tokens_total
        finally:
            engine.shutdown()

    (cold, cold_prefilled), (warm, warm_prefilled) = choices(False), choices(True)
    assert [c[:2] for c in cold] == [c[:2] for c in warm]
    assert cold_prefilled == 3 * len(prompt)
    assert warm_prefilled < 2 * len(prompt), warm_prefilled  # one whole prefill, the others only their tails
    assert [c > 0 for _, _, c in warm] == [False, True, True]  # the first computes, the other two borrow


def test_a_cancelled_chunked_prefill_leaves_only_what_it_wrote_over_the_old_prefix() -> None:
    """Slot 0 holds P1; B (sharing 40 tokens) overwrites it from there, one chunk, and is cancelled:
    a later request with P1 must not take the overwritten positions."""
    cache = PrefixCache(1, chunk=32, rows_independent=True)
    sched = Scheduler(1, 32, 8, threading.Condition(), cache)

    def request(order: int, prompt: list[int]) -> Request:
        handle = type("Handle", (), {"request_id": f"r{order}", "cancelled": False})()
        return Request(
            handle=handle,  # type: ignore[arg-type]
            params=GenerationRequest(prompt, max_tokens=2),
            stop_ids=frozenset(),
            detokenizer=IncrementalDetokenizer(ByteTokenizer()),
            matcher=StopMatcher([]),
            timings=RequestTimings(arrival=0.0),
            order=order,
            tokens=list(prompt),
        )

    def step() -> None:
        plan = sched.schedule()
        for chunk in plan.prefill:  # what the engine records after the model ran the chunk
            cache.computed(chunk.request.slot, chunk.request.tokens, chunk.start, chunk.length)
            chunk.request.cached(chunk.length)

    p1 = [(7 * j) % 251 for j in range(100)]
    p2 = p1[:40] + [(3 * j + 1) % 251 for j in range(60)]
    a = request(0, p1)
    sched.add(a)
    while a.status is not RequestStatus.DECODING:
        step()
    sched.release(a)
    assert cache.slots[0].tokens == p1[:96]  # three dense chunks; the 4-token tail ran on other kernels
    b = request(1, p2)
    sched.add(b)
    step()
    assert b.num_cached_prompt == 40 and b.num_cached == 64  # reused 40, then the chunk up to the boundary
    b.handle.cancelled = True
    step()  # reaps it: its slot keeps what it computed
    assert cache.slots[0].tokens == p2[:64]
    c = request(2, p1)
    sched.add(c)
    sched.schedule()
    assert c.num_cached_prompt == 40
