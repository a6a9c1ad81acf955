"""Engine: continuous batching, scheduling limits, stopping, cancellation, failure isolation, drain.

Oracles: a plain full-recompute greedy loop over a separate copy of the same tiny model (no cache reuse,
no batching), log_softmax of that model's logits, and transformers-checked golden ids for SmolLM2.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
import pytest
import torch

from app.engine import (
    ContextLengthExceeded,
    Engine,
    EngineDraining,
    EngineOverloaded,
    GenerationOutput,
    GenerationRequest,
    InvalidRequest,
    RequestFailed,
)
from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer
from tests.support.engine import GREEDY, collect, generate, ids_of, make_engine, prompt, run, text_of
from tests.support.models import ScriptedModel, tiny_model
from tests.support.reference import logsoftmax_np, reference_greedy


def test_three_times_batch_size_complete_and_running_never_exceeds_it() -> None:
    engine = make_engine(max_batch_size=3)
    requests = [GenerationRequest(prompt(i, 5 + i), GREEDY, max_tokens=4 + i % 3, ignore_eos=True) for i in range(9)]

    async def main() -> list[list[GenerationOutput]]:
        handles = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(collect(h) for h in handles))

    results = run(main())
    engine.shutdown()
    for request, outputs in zip(requests, results):
        assert outputs[-1].finish_reason == "length"
        assert outputs[-1].num_generated_tokens == request.max_tokens == len(ids_of(outputs))
        assert outputs[-1].num_prompt_tokens == len(request.prompt_ids)
    assert max(engine.step_batch_sizes) == 3
    stats = engine.stats()
    assert stats.running == 0 and stats.free_slots == 3 and stats.healthy
    assert stats.generated_tokens_total == sum(r.max_tokens for r in requests)
    assert stats.prompt_tokens_total == sum(len(r.prompt_ids) for r in requests)


def test_greedy_under_continuous_batching_equals_each_request_alone() -> None:
    engine = make_engine(max_batch_size=3, prefill_chunk=6)
    lengths = [(3, 12), (17, 5), (9, 20), (1, 8), (25, 3), (4, 15)]
    requests = [GenerationRequest(prompt(i, p), GREEDY, max_tokens=n, ignore_eos=True) for i, (p, n) in enumerate(lengths)]

    async def main() -> list[list[GenerationOutput]]:
        tasks = []
        for i, request in enumerate(requests):  # staggered arrivals: each joins a batch already running
            tasks.append(asyncio.ensure_future(collect(engine.submit(request))))
            await asyncio.sleep(0.002 * (i % 3))
        return await asyncio.gather(*tasks)

    results = run(main())
    engine.shutdown()
    for request, outputs in zip(requests, results):
        assert ids_of(outputs) == reference_greedy(request.prompt_ids, request.max_tokens)


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd() -> None:
    seeded = GenerationRequest(prompt(1, 6), SamplingParams(temperature=1.0, top_p=0.9, seed=7), max_tokens=12, ignore_eos=True)
    crowd = [
        GenerationRequest(prompt(i, 3 + i), SamplingParams(temperature=0.9), max_tokens=6 + i, ignore_eos=True) for i in range(3)
    ]

    async def alone() -> list[int]:
        engine = make_engine(max_batch_size=4)
        try:
            return ids_of(await collect(engine.submit(seeded)))
        finally:
            engine.shutdown()

    async def together() -> list[int]:
        engine = make_engine(max_batch_size=4)
        try:
            handles = [engine.submit(r) for r in crowd[:2]] + [engine.submit(seeded)] + [engine.submit(crowd[2])]
            results = await asyncio.gather(*(collect(h) for h in handles))
            return ids_of(results[2])
        finally:
            engine.shutdown()

    first = run(alone())
    assert run(together()) == first
    other_seed = GenerationRequest(
        seeded.prompt_ids, SamplingParams(temperature=1.0, top_p=0.9, seed=8), max_tokens=12, ignore_eos=True
    )

    async def other() -> list[int]:
        engine = make_engine()
        try:
            return ids_of(await collect(engine.submit(other_seed)))
        finally:
            engine.shutdown()

    assert run(other()) != first


def test_stop_string_spanning_tokens_never_leaks() -> None:
    # With the byte tokenizer every character is its own token, so a 3-character stop spans 3 tokens.
    source = prompt(3, 6)
    ref_ids = reference_greedy(source, 40)
    full = ByteTokenizer().decode(ref_ids)
    stop = full[10:13]
    expected = full[: full.find(stop)]
    engine = make_engine()
    outputs = run(generate(engine, GenerationRequest(source, GREEDY, max_tokens=40, stop=[stop, "never-there"], ignore_eos=True)))
    engine.shutdown()
    assert text_of(outputs) == expected
    assert outputs[-1].finish_reason == "stop"
    assert all(stop not in text_of(outputs[: i + 1]) for i in range(len(outputs)))


def test_eos_stops_counts_but_is_not_rendered_and_min_tokens_delays_it() -> None:
    tok = ByteTokenizer()
    eos = tok.eos_id
    assert eos is not None
    force_eos = SamplingParams(temperature=0, logit_bias={eos: 100.0})
    engine = make_engine()

    async def main() -> tuple[list[GenerationOutput], list[GenerationOutput], list[GenerationOutput]]:
        plain = collect(engine.submit(GenerationRequest(prompt(0, 4), force_eos, max_tokens=10)))
        delayed = collect(engine.submit(GenerationRequest(prompt(0, 4), force_eos, max_tokens=10, min_tokens=3)))
        ignored = collect(engine.submit(GenerationRequest(prompt(0, 4), force_eos, max_tokens=5, ignore_eos=True)))
        return await asyncio.gather(plain, delayed, ignored)

    plain, delayed, ignored = run(main())
    engine.shutdown()
    assert ids_of(plain) == [eos] and text_of(plain) == "" and plain[-1].finish_reason == "stop"
    assert plain[-1].num_generated_tokens == 1
    assert len(ids_of(delayed)) == 4 and ids_of(delayed)[-1] == eos and eos not in ids_of(delayed)[:3]
    assert text_of(delayed) == tok.decode(ids_of(delayed)[:3]) and delayed[-1].finish_reason == "stop"
    assert ids_of(ignored) == [eos] * 5 and ignored[-1].finish_reason == "length"


def test_extra_stop_token_ids_stop() -> None:
    source = prompt(5, 7)
    ref = reference_greedy(source, 20)
    target = ref[6]
    engine = make_engine()
    outputs = run(generate(engine, GenerationRequest(source, GREEDY, max_tokens=20, stop_token_ids=[target], ignore_eos=True)))
    engine.shutdown()
    assert ids_of(outputs) == ref[: ref.index(target) + 1]
    assert outputs[-1].finish_reason == "stop"


def test_cancel_frees_the_slot_within_one_step() -> None:
    engine = make_engine(max_batch_size=1)

    async def main() -> list[int]:
        long = engine.submit(GenerationRequest(prompt(0, 4), GREEDY, max_tokens=100, ignore_eos=True))
        iterator = long.__aiter__()
        await iterator.__anext__()
        long.cancel()
        steps_at_cancel = engine.stats().steps
        while engine.stats().running:
            await asyncio.sleep(0.001)
        freed_after = engine.stats().steps - steps_at_cancel
        assert [o async for o in iterator] == []  # the iterator just ends
        # A closed iterator (client went away) frees its slot too.
        second = engine.submit(GenerationRequest(prompt(1, 4), GREEDY, max_tokens=100, ignore_eos=True))
        iterator = second.__aiter__()
        await iterator.__anext__()
        await iterator.aclose()
        while engine.stats().running:
            await asyncio.sleep(0.001)
        # A cancelled consumer task does the same.
        third = engine.submit(GenerationRequest(prompt(2, 4), GREEDY, max_tokens=100, ignore_eos=True))
        got_first = asyncio.Event()

        async def consume() -> None:
            async for _ in third:
                got_first.set()

        task = asyncio.ensure_future(consume())
        await got_first.wait()
        task.cancel()
        while engine.stats().running:
            await asyncio.sleep(0.001)
        last = await collect(engine.submit(GenerationRequest(prompt(3, 4), GREEDY, max_tokens=3, ignore_eos=True)))
        return [freed_after, len(ids_of(last))]

    freed_after, last_tokens = run(main())
    engine.shutdown()
    assert freed_after <= 2  # the step in flight at cancel time, then the one that frees it
    assert last_tokens == 3
    assert engine.stats().generated_tokens_total < 100


def test_full_queue_is_refused_at_once() -> None:
    engine = make_engine(max_batch_size=1, max_queue=2, start=False)

    async def main() -> list[list[GenerationOutput]]:
        handles = [engine.submit(GenerationRequest(prompt(i, 3), GREEDY, max_tokens=2)) for i in range(2)]
        with pytest.raises(EngineOverloaded):
            engine.submit(GenerationRequest(prompt(9, 3), GREEDY, max_tokens=2))
        assert engine.stats().waiting == 2
        engine.start()
        return await asyncio.gather(*(collect(h) for h in handles))

    results = run(main())
    engine.shutdown()
    assert all(r[-1].finish_reason is not None for r in results)


def test_poisoned_request_fails_alone() -> None:
    engine = make_engine(max_batch_size=2)
    good = [GenerationRequest(prompt(i, 5), GREEDY, max_tokens=6, ignore_eos=True) for i in range(3)]
    poisoned = GenerationRequest(prompt(7, 5), SamplingParams(temperature=0, logit_bias={10**6: 5.0}), max_tokens=6)

    async def main() -> list[Any]:
        handles = [engine.submit(good[0])]
        validate = engine.validate
        engine.validate = lambda request: None  # type: ignore[method-assign]  # it got past validation
        handles.append(engine.submit(poisoned))
        engine.validate = validate  # type: ignore[method-assign]
        handles += [engine.submit(r) for r in good[1:]]
        return await asyncio.gather(*(collect(h) for h in handles), return_exceptions=True)

    results = run(main())
    engine.shutdown()
    assert isinstance(results[1], RequestFailed)
    for request, outputs in zip(good, [results[0], results[2], results[3]]):
        assert ids_of(outputs) == reference_greedy(request.prompt_ids, request.max_tokens)
    assert engine.stats().healthy


def test_loop_death_makes_engine_unhealthy_and_nobody_hangs() -> None:
    engine = make_engine(max_batch_size=2)
    forward = engine.model
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated device failure")
        return forward(*args, **kwargs)

    engine.model = flaky  # type: ignore[assignment]

    async def main() -> list[Any]:
        handles = [engine.submit(GenerationRequest(prompt(i, 4), GREEDY, max_tokens=50, ignore_eos=True)) for i in range(4)]
        return await asyncio.gather(*(collect(h) for h in handles), return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, RequestFailed) for r in results)
    assert not engine.stats().healthy and not engine.stats().accepting

    async def after() -> None:
        with pytest.raises(EngineOverloaded):
            engine.submit(GenerationRequest(prompt(0, 4), GREEDY, max_tokens=1))

    run(after())
    engine.shutdown()


def test_validation_errors_before_queueing() -> None:
    engine = make_engine(max_seq_len=64, start=False)
    with pytest.raises(ContextLengthExceeded) as info:
        engine.validate(GenerationRequest(prompt(0, 60), max_tokens=10))
    err = info.value
    assert (err.max_context, err.prompt_tokens, err.max_tokens) == (64, 60, 10)
    assert str(err) == (
        "This model's maximum context length is 64 tokens. However, you requested 70 tokens "
        "(60 in the prompt, 10 in the completion)."
    )
    with pytest.raises(ContextLengthExceeded):
        engine.validate(GenerationRequest(prompt(0, 65), max_tokens=0))
    cases = [
        (GenerationRequest([]), "prompt"),
        (GenerationRequest([1, 259]), "prompt"),
        (GenerationRequest([1, -1]), "prompt"),
        (GenerationRequest([1], max_tokens=-1), "max_tokens"),
        (GenerationRequest([1], SamplingParams(temperature=-1)), "temperature"),
        (GenerationRequest([1], SamplingParams(logit_bias={999: 1.0})), "logit_bias"),
        (GenerationRequest([1], stop_token_ids=[300]), "stop_token_ids"),
        (GenerationRequest([1], max_tokens=2, min_tokens=3), "min_tokens"),
    ]
    for request, param in cases:
        with pytest.raises(InvalidRequest) as bad:
            engine.validate(request)
        assert bad.value.param == param
    engine.validate(GenerationRequest(prompt(0, 54), max_tokens=10))  # exactly fits
    assert engine.stats().waiting == 0


def test_prompt_logprobs_with_max_tokens_zero_across_prefill_chunks() -> None:
    source = prompt(4, 11)
    engine = make_engine(prefill_chunk=4)  # 11 tokens: chunks of 4, 4, 3
    request = GenerationRequest(source, SamplingParams(temperature=0, logprobs=2), max_tokens=0, prompt_logprobs=True)
    outputs = run(generate(engine, request))
    engine.shutdown()
    assert len(outputs) == 1
    out = outputs[0]
    assert out.finish_reason == "length" and out.token_ids == [] and out.text == "" and out.num_generated_tokens == 0
    logits = tiny_model(1, 128)(torch.tensor([source]), torch.arange(len(source))[None], all_logits=True)[0]
    ref = logsoftmax_np(logits.numpy())
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(source)
    for t, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry is not None and entry.token_id == source[t]
        assert entry.logprob == pytest.approx(ref[t - 1, source[t]], abs=1e-4)
        assert [i for i, _ in entry.top] == list(np.argsort(-ref[t - 1])[:2])


def test_generated_logprobs_and_timings() -> None:
    source = prompt(6, 5)
    engine = make_engine()
    request = GenerationRequest(
        source, SamplingParams(temperature=0, logprobs=3), max_tokens=4, ignore_eos=True, prompt_logprobs=True
    )
    outputs = run(generate(engine, request))
    engine.shutdown()
    ids = ids_of(outputs)
    assert ids == reference_greedy(source, 4)
    full = source + ids
    logits = tiny_model(1, 128)(torch.tensor([full]), torch.arange(len(full))[None], all_logits=True)[0]
    ref = logsoftmax_np(logits.numpy())
    entries = [lp for out in outputs for lp in (out.logprobs or [])]
    assert [e.token_id for e in entries] == ids
    for k, entry in enumerate(entries):
        row = len(source) - 1 + k
        assert entry.logprob == pytest.approx(ref[row, ids[k]], abs=1e-4)
        assert math.isfinite(entry.logprob) and len(entry.top) == 3
    assert outputs[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outputs[1:])
    timings = outputs[-1].timings
    assert timings is not None and all(o.timings is None for o in outputs[:-1])
    assert timings.arrival <= timings.scheduled <= timings.first_token <= timings.finished  # type: ignore[operator]


def test_long_prompt_prefill_is_chunked_and_does_not_stall_a_running_stream() -> None:
    engine = make_engine(max_batch_size=2, prefill_chunk=8)

    async def main() -> int:
        stream = engine.submit(GenerationRequest(prompt(0, 4), GREEDY, max_tokens=60, ignore_eos=True))
        iterator = stream.__aiter__()
        await iterator.__anext__()
        long = engine.submit(GenerationRequest(prompt(1, 100), GREEDY, max_tokens=2, ignore_eos=True))
        long_first = asyncio.ensure_future(long.__aiter__().__anext__())
        tokens_meanwhile = 0
        while not long_first.done():
            await iterator.__anext__()
            tokens_meanwhile += 1
        [o async for o in iterator]
        return tokens_meanwhile

    tokens_meanwhile = run(main())
    engine.shutdown()
    # 100 prompt tokens at 8 per step take 13 steps; the stream gets a token in each of them.
    assert tokens_meanwhile >= 11


def test_drain_refuses_new_work_and_ends_the_rest_with_abort() -> None:
    """What the drain timeout cuts ends with "abort", never "length" (which would read as max_tokens)."""
    engine = make_engine(max_batch_size=1)
    forward = engine.model

    def slow(*args: Any, **kwargs: Any) -> torch.Tensor:  # 120 steps must outlast the drain timeout
        time.sleep(0.005)
        return forward(*args, **kwargs)

    engine.model = slow  # type: ignore[assignment]

    async def main() -> tuple[list[GenerationOutput], list[GenerationOutput]]:
        running = engine.submit(GenerationRequest(prompt(0, 4), GREEDY, max_tokens=120, ignore_eos=True))
        waiting = engine.submit(GenerationRequest(prompt(1, 4), GREEDY, max_tokens=5, ignore_eos=True))
        first = asyncio.ensure_future(collect(running))
        second = asyncio.ensure_future(collect(waiting))
        await asyncio.sleep(0.01)
        drain = asyncio.ensure_future(engine.drain(timeout=0.05))
        await asyncio.sleep(0)
        with pytest.raises(EngineDraining):
            engine.submit(GenerationRequest(prompt(2, 4), GREEDY, max_tokens=1))
        await drain
        return await first, await second

    first, second = run(main())
    assert first[-1].finish_reason == "abort" and len(ids_of(first)) < 120
    assert second[-1].finish_reason == "abort"
    assert not engine.stats().accepting
    engine.shutdown()


def test_idle_engine_sleeps() -> None:
    engine = make_engine()
    run(generate(engine, GenerationRequest(prompt(0, 3), GREEDY, max_tokens=2)))

    async def idle_steps() -> int:
        await asyncio.sleep(0.05)  # the step that emitted the last output finishes its bookkeeping
        steps = engine.stats().steps
        await asyncio.sleep(0.2)
        return engine.stats().steps - steps

    assert run(idle_steps()) == 0
    engine.shutdown()
    assert engine._thread is not None and not engine._thread.is_alive()


def test_default_model_golden_greedy_in_a_batch(smollm2_path: Any) -> None:
    """Golden ids checked against transformers and llama.cpp (docs/default-model facts)."""
    from model.checkpoint import load_model

    loaded = load_model(smollm2_path, max_batch_size=2, max_seq_len=64)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=2, max_seq_len=64)
    engine.start()
    golden_prompt = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    other = loaded.tokenizer.encode("Once upon a time")

    seeded = GenerationRequest(other, SamplingParams(temperature=1.0, top_p=0.95, seed=1), max_tokens=12, ignore_eos=True)

    async def main() -> tuple[list[GenerationOutput], list[GenerationOutput], list[GenerationOutput]]:
        alone = await generate(engine, seeded)
        a = engine.submit(GenerationRequest(golden_prompt, GREEDY, max_tokens=20))
        b = engine.submit(seeded)
        golden, crowded = await asyncio.gather(collect(a), collect(b))
        return golden, alone, crowded

    golden, alone, crowded = run(main())
    engine.shutdown()
    assert ids_of(crowded) == ids_of(alone)  # a seed holds across batch compositions on real weights too
    assert ids_of(golden) == [504, 3575, 282, 4649, 314, 7042, 30, 2]
    assert text_of(golden) == "The capital of France is Paris."
    assert golden[-1].finish_reason == "stop"


def test_offline_generate_loop_matches_the_recompute_oracle() -> None:
    from model.generate import generate_tokens

    source = prompt(8, 9)
    model = tiny_model(1, 128)
    out = list(generate_tokens(model, source, GREEDY, max_tokens=12, prefill_chunk=4))
    assert out == reference_greedy(source, 12)


def test_multibyte_characters_split_across_tokens_and_a_stop_after_them() -> None:
    prompt_ids = list(b"Q:")
    generated = list("aé€ xEND yy".encode())  # é and € span 2 and 3 tokens
    engine = Engine(
        ScriptedModel(prompt_ids + generated, max_batch_size=2, max_seq_len=64), ByteTokenizer(), max_batch_size=2, max_seq_len=64
    )
    engine.start()
    outputs = run(generate(engine, GenerationRequest(prompt_ids, GREEDY, max_tokens=30, stop=["END"])))
    engine.shutdown()
    assert [o.text for o in outputs if o.text] == ["a", "é", "€", " ", "x"]
    assert all("\ufffd" not in o.text for o in outputs)
    assert outputs[-1].finish_reason == "stop"
    assert ids_of(outputs) == generated[: generated.index(ord("D")) + 1]


def test_max_tokens_zero_without_logprobs_finishes_without_running_the_model() -> None:
    engine = make_engine()
    calls = {"n": 0}
    forward = engine.model

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        return forward(*args, **kwargs)

    engine.model = counted  # type: ignore[assignment]
    outputs = run(generate(engine, GenerationRequest(prompt(0, 5), max_tokens=0)))
    engine.shutdown()
    assert [(o.finish_reason, o.token_ids, o.num_prompt_tokens) for o in outputs] == [("length", [], 5)]
    assert calls["n"] == 0 and engine.stats().free_slots == 4
