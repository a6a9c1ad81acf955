"""Sampler: every filter and penalty against an independent reference (transformers' logits processors
or numpy math written out here), seeded determinism, logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model.sampling import LOGPROB_FLOOR, Sampler, SamplingParamError, SamplingParams, prompt_logprobs, validate_sampling
from tests.support.reference import logsoftmax_np

V = 64


def random_logits(rows: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def force(sampler: Sampler, slot: int, tokens: list[int]) -> None:
    """Make `slot` generate exactly `tokens` (a huge logit on each), so its penalty counts hold them."""
    for t in tokens:
        logits = torch.zeros(1, sampler.vocab_size)
        logits[0, t] = 1e4
        assert sampler.sample(logits, [slot]).token_ids == [t]


def hf_reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers in vLLM's order: temperature, min_p, top_k, top_p."""
    x = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p, min_tokens_to_keep=1)(ids, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    return x[0]


def test_greedy_is_argmax() -> None:
    sampler = Sampler(3, V)
    for slot in range(3):
        sampler.set_slot(slot, SamplingParams(temperature=0), [1])
    logits = random_logits(3)
    assert sampler.sample(logits, [0, 1, 2]).token_ids == logits.argmax(-1).tolist()


FILTER_CASES = [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.5, top_k=10, top_p=0.9, min_p=0.02),
    SamplingParams(temperature=2.0),
]


def test_filters_match_transformers_in_one_mixed_batch() -> None:
    sampler = Sampler(len(FILTER_CASES), V)
    for slot, p in enumerate(FILTER_CASES):
        sampler.set_slot(slot, p, [1])
    logits = random_logits(len(FILTER_CASES), seed=1)
    ours = sampler.processed_logits(logits, list(range(len(FILTER_CASES))))
    for row, p in enumerate(FILTER_CASES):
        ref = hf_reference(logits[row], p)
        assert torch.equal(torch.isfinite(ours[row]), torch.isfinite(ref)), p
        torch.testing.assert_close(torch.softmax(ours[row], -1), torch.softmax(ref, -1), atol=1e-6, rtol=1e-5)


def test_repetition_penalty_matches_transformers_on_prompt_and_generated() -> None:
    sampler = Sampler(2, V)
    prompt = [3, 7, 7, 20]
    sampler.set_slot(1, SamplingParams(temperature=0, repetition_penalty=1.3), prompt)
    force(sampler, 1, [5, 40])
    logits = random_logits(1, seed=2)
    ours = sampler.processed_logits(logits, [1])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + [5, 40]]), logits.clone())
    torch.testing.assert_close(ours, ref)


def test_presence_and_frequency_penalties_on_generated_tokens_only() -> None:
    sampler = Sampler(1, V)
    sampler.set_slot(0, SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.3), [9, 9, 9])
    generated = [4, 4, 11]
    force(sampler, 0, generated)
    logits = random_logits(1, seed=3)
    ours = sampler.processed_logits(logits, [0])[0].numpy()
    counts = np.bincount(generated, minlength=V).astype(np.float32)
    expected = logits[0].numpy() - 0.3 * counts - 0.5 * (counts > 0)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    assert ours[9] == logits[0, 9].item()  # prompt tokens are not penalised (OpenAI semantics)


def test_logit_bias_moves_greedy_choice_and_other_rows_are_untouched() -> None:
    sampler = Sampler(2, V)
    logits = random_logits(2, seed=4)
    weakest = int(logits[0].argmin())
    sampler.set_slot(0, SamplingParams(temperature=0, logit_bias={weakest: 100.0}), [1])
    sampler.set_slot(1, SamplingParams(temperature=0), [1])
    out = sampler.sample(logits, [0, 1]).token_ids
    assert out == [weakest, int(logits[1].argmax())]


def test_suppressed_ids_are_never_chosen() -> None:
    sampler = Sampler(2, V)
    logits = random_logits(2, seed=5)
    best = int(logits[0].argmax())
    sampler.set_slot(0, SamplingParams(temperature=0), [1], suppress_ids=[best])
    assert sampler.sample(logits[:1], [0], suppress=[True]).token_ids != [best]
    assert sampler.sample(logits[:1], [0], suppress=[False]).token_ids == [best]


def test_sampling_follows_the_distribution() -> None:
    rows = 4000
    sampler = Sampler(rows, 6, seed=123)
    p = SamplingParams(temperature=1.0, top_k=4)
    for slot in range(rows):
        sampler.set_slot(slot, p, [0])
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    drawn = sampler.sample(base.expand(rows, 6).clone(), list(range(rows))).token_ids
    freq = np.bincount(drawn, minlength=6) / rows
    expected = torch.softmax(hf_reference(base, p), -1).numpy()
    np.testing.assert_allclose(freq, expected, atol=0.03)
    assert freq[4] == 0 and freq[3] == 0  # outside the top 4


def test_draw_across_blocks_follows_the_distribution_and_skips_filtered_tokens() -> None:
    """The two-level inverse CDF: mass spread over several blocks, filtered tokens at block edges."""
    rows, vocab = 6000, 1000  # not a multiple of the block size
    allowed = [0, 255, 256, 511, 700, 998]  # first/last token of blocks and a token near the end
    logits = torch.full((vocab,), -math.inf)
    logits[torch.tensor(allowed)] = torch.tensor([0.0, 1.0, 0.5, -0.5, 1.5, 0.2])
    sampler = Sampler(rows, vocab, seed=7)
    for slot in range(rows):
        sampler.set_slot(slot, SamplingParams(temperature=1.0), [0])
    drawn = sampler.sample(logits.expand(rows, vocab).clone(), list(range(rows))).token_ids
    freq = np.bincount(drawn, minlength=vocab) / rows
    expected = torch.softmax(logits, -1).numpy()
    assert set(drawn) <= set(allowed)
    np.testing.assert_allclose(freq[allowed], expected[allowed], atol=0.03)


def test_a_uniform_that_rounds_up_to_the_total_still_picks_a_token_with_mass(monkeypatch: pytest.MonkeyPatch) -> None:
    """uniform * total can round up to the total; the draw must then take the last token with mass,
    not run past the cdf or land on a filtered token after it."""
    vocab = 9
    logits = torch.full((2, vocab), -math.inf)
    logits[:, [1, 4, 6]] = torch.tensor([0.3, -1.0, 0.7])
    sampler = Sampler(2, vocab, seed=0)
    for slot in range(2):
        sampler.set_slot(slot, SamplingParams(temperature=0.9, top_p=0.999), [0])
    monkeypatch.setattr(torch, "rand", lambda n, **kwargs: torch.ones(n))  # the worst rounding: u * total == total
    assert sampler.sample(logits.clone(), [0, 1]).token_ids == [6, 6]


def seeded_run(slot: int, others: int, seed: int, steps: int = 20) -> list[int]:
    """Draw `steps` tokens for a seeded request in `slot`, next to `others` unseeded rows."""
    sampler = Sampler(8, V)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    sampler.set_slot(slot, p, [1])
    neighbours = [s for s in range(8) if s != slot][:others]
    for s in neighbours:
        sampler.set_slot(s, SamplingParams(temperature=0.8, top_k=7), [2])
    slots = sorted(neighbours + [slot])
    out = []
    for step in range(steps):
        logits = random_logits(len(slots), seed=100 + step)
        logits[slots.index(slot)] = random_logits(1, seed=step)[0]  # our row's logits depend on the step only
        out.append(sampler.sample(logits, slots).token_ids[slots.index(slot)])
    return out


def test_seeded_sampling_does_not_depend_on_the_batch() -> None:
    alone = seeded_run(slot=0, others=0, seed=42)
    assert seeded_run(slot=5, others=4, seed=42) == alone
    assert seeded_run(slot=2, others=7, seed=42) == alone
    assert seeded_run(slot=0, others=0, seed=43) != alone
    assert len(set(alone)) > 3  # really sampled, not greedy


def test_logprobs_are_raw_log_softmax_with_sorted_alternatives() -> None:
    sampler = Sampler(3, V)
    sampler.set_slot(0, SamplingParams(temperature=0.5, presence_penalty=1.0, logprobs=3), [1])
    sampler.set_slot(1, SamplingParams(temperature=0), [1])  # no logprobs
    sampler.set_slot(2, SamplingParams(temperature=0, logprobs=5), [1])
    logits = random_logits(3, seed=6)
    logits[2, 2:] = -math.inf  # only two finite tokens: the other alternatives must come out finite
    out = sampler.sample(logits, [0, 1, 2])
    assert out.logprobs is not None and out.logprobs[1] is None
    ref = logsoftmax_np(logits.numpy())
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(ref[0, first.token_id], abs=1e-5)
    assert [t for t, _ in first.top] == list(np.argsort(-ref[0])[:3])
    assert [lp for _, lp in first.top] == sorted((lp for _, lp in first.top), reverse=True)
    np.testing.assert_allclose([lp for _, lp in first.top], np.sort(ref[0])[::-1][:3], atol=1e-5)
    third = out.logprobs[2]
    assert third.token_id == int(logits[2].argmax())
    assert [lp for _, lp in third.top][2:] == [LOGPROB_FLOOR] * 3
    assert all(math.isfinite(lp) for _, lp in third.top) and len(third.top) == 5


def test_prompt_logprobs_are_finite_and_match_reference() -> None:
    logits = random_logits(4, seed=7)
    logits[1, 9] = -math.inf
    entries = prompt_logprobs(logits, [3, 9, 4, 60], k=2)
    ref = logsoftmax_np(logits.numpy())
    assert [e.token_id for e in entries] == [3, 9, 4, 60]
    assert entries[1].logprob == LOGPROB_FLOOR
    for row, e in enumerate(entries):
        assert math.isfinite(e.logprob)
        if row != 1:
            assert e.logprob == pytest.approx(ref[row, e.token_id], abs=1e-5)
        assert [t for t, _ in e.top] == list(np.argsort(-ref[row])[:2])


@pytest.mark.parametrize(
    "params, param",
    [
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(min_p=1.5), "min_p"),
        (SamplingParams(presence_penalty=2.5), "presence_penalty"),
        (SamplingParams(frequency_penalty=-3), "frequency_penalty"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(logprobs=21), "logprobs"),
        (SamplingParams(logit_bias={V: 1.0}), "logit_bias"),
        (SamplingParams(logit_bias={1: 101.0}), "logit_bias"),
    ],
)
def test_validation_names_the_parameter(params: SamplingParams, param: str) -> None:
    with pytest.raises(SamplingParamError) as info:
        validate_sampling(params, V)
    assert info.value.param == param
    validate_sampling(SamplingParams(), V)


def test_large_vocab_greedy_batch_skips_filters_and_is_fast_enough() -> None:
    """A greedy-only batch must not sort the vocabulary (the common serving case)."""
    sampler = Sampler(8, 49152)
    for slot in range(8):
        sampler.set_slot(slot, SamplingParams(temperature=0), [1])
    logits = random_logits(8, vocab=49152)
    calls = []
    original = torch.Tensor.sort
    torch.Tensor.sort = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    try:
        out = sampler.sample(logits, list(range(8)))
    finally:
        torch.Tensor.sort = original  # type: ignore[method-assign]
    assert out.token_ids == logits.argmax(-1).tolist() and not calls


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])  # flat (needs many candidates) to peaked
def test_filters_on_a_large_vocabulary_match_transformers(scale: float) -> None:
    vocab = 3000
    cases = [
        SamplingParams(temperature=1.0, top_p=0.95),
        SamplingParams(temperature=0.8, top_k=300, top_p=0.7),
        SamplingParams(temperature=1.0, min_p=0.3, top_p=0.9),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.9, top_k=5),
    ]
    sampler = Sampler(len(cases), vocab)
    for slot, p in enumerate(cases):
        sampler.set_slot(slot, p, [1])
    logits = random_logits(len(cases), seed=11, vocab=vocab) * scale
    ours = sampler.processed_logits(logits, list(range(len(cases))))
    for row, p in enumerate(cases):
        ref = hf_reference(logits[row], p)
        assert torch.equal(torch.isfinite(ours[row]), torch.isfinite(ref)), (
            p,
            int(torch.isfinite(ours[row]).sum()),
            int(torch.isfinite(ref).sum()),
        )
        torch.testing.assert_close(torch.softmax(ours[row], -1), torch.softmax(ref, -1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-7])
def test_vanishing_temperature_is_greedy_not_garbage(temperature: float) -> None:
    """x / T overflows fp32 for T ~ 1e-37; softmax of inf was NaN and every draw fell on token 0."""
    sampler = Sampler(4, V)
    params = SamplingParams(temperature=temperature, top_p=0.9, seed=1)
    validate_sampling(params, V)  # a valid request
    logits = random_logits(4, seed=3)
    for slot in range(4):
        sampler.set_slot(slot, params, [1])
    for _ in range(3):
        assert sampler.sample(logits, [0, 1, 2, 3]).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("penalty", [1e-30, 1e-50])
def test_tiny_repetition_penalty_keeps_the_distribution_finite(penalty: float) -> None:
    """A penalty that rounds to 0 in fp32 divided by zero; the sampled token must still be a seen one."""
    sampler = Sampler(2, V)
    params = SamplingParams(temperature=1.0, repetition_penalty=penalty)
    validate_sampling(params, V)
    logits = random_logits(2, seed=4)
    seen = [int(logits[0].argsort()[V // 2]), int(logits[0].argsort()[V // 2 + 1])]  # middling logits
    logits[:, seen] = logits[:, seen].abs() + 0.1  # positive: a penalty < 1 multiplies them up
    for slot in range(2):
        sampler.set_slot(slot, params, seen)
    x = sampler.processed_logits(logits, [0, 1])
    assert not torch.isnan(x).any() and not torch.isposinf(x).any()
    for _ in range(5):
        assert set(sampler.sample(logits, [0, 1]).token_ids) <= set(seen)


def test_top_k_one_and_min_p_one_are_greedy_under_sampling() -> None:
    sampler = Sampler(4, V)
    logits = random_logits(4, seed=5)
    sampler.set_slot(0, SamplingParams(temperature=1.5, top_k=1, seed=3), [1])
    sampler.set_slot(1, SamplingParams(temperature=1.5, min_p=1.0), [1])
    sampler.set_slot(2, SamplingParams(temperature=1.5, top_p=1e-9), [1])
    sampler.set_slot(3, SamplingParams(temperature=2.0, logit_bias={7: 100.0}), [1])
    expected = logits.argmax(-1).tolist()[:3] + [7]
    for _ in range(20):
        assert sampler.sample(logits, [0, 1, 2, 3]).token_ids == expected


def test_logit_bias_minus_100_bans_under_sampling_and_counts_record_the_choice() -> None:
    sampler = Sampler(2, V)
    logits = random_logits(2, seed=6)
    best = logits.argmax(-1).tolist()
    sampler.set_slot(0, SamplingParams(temperature=1.0, logit_bias={best[0]: -100.0}, logprobs=2), [1])
    sampler.set_slot(1, SamplingParams(temperature=0, logit_bias={best[1]: -100.0}), [1])
    chosen: list[list[int]] = []
    for _ in range(60):
        out = sampler.sample(logits, [0, 1])
        chosen.append(out.token_ids)
        assert out.logprobs is not None and out.logprobs[1] is None
        entry = out.logprobs[0]
        assert entry is not None and entry.token_id == out.token_ids[0] and math.isfinite(entry.logprob)
        assert [t for t, _ in entry.top] == logits[0].topk(2).indices.tolist()  # raw logits: bias not applied
    assert all(row[0] != best[0] and row[1] != best[1] for row in chosen)
    for slot in (0, 1):
        counts = torch.zeros(V)
        for row in chosen:
            counts[row[slot]] += 1
        assert torch.equal(sampler.counts[slot], counts)


def test_logprobs_stay_finite_for_impossible_tokens() -> None:
    sampler = Sampler(1, V)
    sampler.set_slot(0, SamplingParams(temperature=0, logit_bias={3: 100.0}, logprobs=5), [1])
    logits = torch.zeros(1, V)
    logits[0, 3] = -math.inf  # the model says never; the bias cannot revive -inf, but nothing may be NaN/inf
    logits[0, 9] = 1e4
    out = sampler.sample(logits, [0])
    entry = out.logprobs[0]  # type: ignore[index]
    assert entry is not None and all(math.isfinite(lp) for _, lp in entry.top) and math.isfinite(entry.logprob)


def test_more_logprobs_than_the_vocabulary_lists_every_token_instead_of_failing() -> None:
    """topk(k > V) raised inside the batched step, which would kill the engine for every request."""
    vocab = 8
    sampler = Sampler(2, vocab)
    sampler.set_slot(0, SamplingParams(temperature=0, logprobs=20), [1])
    sampler.set_slot(1, SamplingParams(temperature=0), [1])
    logits = random_logits(2, seed=7, vocab=vocab)
    out = sampler.sample(logits, [0, 1])
    entry = out.logprobs[0]  # type: ignore[index]
    assert entry is not None and [t for t, _ in entry.top] == logits[0].argsort(descending=True).tolist()
    echoed = prompt_logprobs(logits, [1, 2], 20)
    assert [len(e.top) for e in echoed] == [vocab, vocab]


def test_an_unseeded_sampler_leaves_the_global_torch_rng_alone() -> None:
    """Sampler() used torch.seed(), which reseeds torch's global generator from the OS: anything seeded
    with torch.manual_seed in the same process (a tiny model's weights built while an engine thread
    starts, a user's script) stopped being reproducible."""
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    sampler = Sampler(2, V)
    assert torch.equal(torch.rand(4), expected)
    other = Sampler(2, V)
    draws = [s.shared.initial_seed() for s in (sampler, other)]
    assert draws[0] != draws[1]  # still a fresh seed per sampler
