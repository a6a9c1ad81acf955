"""Per-row KV slots: a batch of requests decodes exactly as each request alone, and reused slots are clean.

The oracle for "alone" is a fresh model (same weights) that has only ever seen that one prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoint import load_weights
from model.kv_cache import KVCache
from model.llama import Transformer
from tests.support.models import tiny_model
from tests.support.oracle import GOLDEN_PROMPT, one_thread

STEPS = 12


def decode_alone(model: Transformer, prompt: list[int], steps: int, slot: int = 0) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of each step for one prompt in one slot."""
    slots = torch.tensor([slot])
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], slots)
    tokens, all_logits = [], []
    for i in range(steps):
        all_logits.append(logits[0])
        tokens.append(int(logits[0].argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([[len(prompt) + i]]), slots)
    return tokens, torch.stack(all_logits)


def decode_batched(
    model: Transformer, prompts: list[list[int]], slots: list[int] | None, steps: int
) -> tuple[list[list[int]], torch.Tensor]:
    """All prompts in one batch: one right-padded prefill, then one decode row per request per step.

    Padding writes junk keys past a short prompt's end; each decode step overwrites its own position
    before reading it, and no query reads past its own position, so the junk is never seen.
    """
    batch, width = len(prompts), max(map(len, prompts))
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    slot_tensor = None if slots is None else torch.tensor(slots)
    logits = model(tokens, torch.arange(width).repeat(batch, 1), slot_tensor, all_logits=True)
    logits = logits[torch.arange(batch), lengths - 1]
    out: list[list[int]] = [[] for _ in prompts]
    all_logits = []
    for i in range(steps):
        all_logits.append(logits)
        step = logits.argmax(-1)
        for row, token in zip(out, step.tolist()):
            row.append(token)
        logits = model(step[:, None], (lengths + i)[:, None], slot_tensor)
    return out, torch.stack(all_logits, dim=1)


def prompts_of_lengths(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_batch_of_eight_matches_each_alone() -> None:
    prompts = prompts_of_lengths([1, 7, 3, 20, 12, 5, 16, 9])
    slots = [5, 2, 7, 0, 3, 6, 1, 4]  # not the identity: rows gather their own slot
    batched, batched_logits = decode_batched(tiny_model(max_batch_size=8), prompts, slots, STEPS)
    for row, prompt in enumerate(prompts):
        alone, alone_logits = decode_alone(tiny_model(max_batch_size=1), prompt, STEPS)
        assert batched[row] == alone, f"row {row} (prompt length {len(prompt)})"
        torch.testing.assert_close(batched_logits[row], alone_logits, atol=1e-4, rtol=0)


def test_implicit_slots_match_explicit_slots() -> None:
    prompts = prompts_of_lengths([4, 11, 2, 8], seed=1)
    implicit, _ = decode_batched(tiny_model(max_batch_size=4), prompts, None, STEPS)
    explicit, _ = decode_batched(tiny_model(max_batch_size=4), prompts, [0, 1, 2, 3], STEPS)
    alone = [decode_alone(tiny_model(max_batch_size=1), p, STEPS)[0] for p in prompts]
    assert implicit == explicit == alone


def test_reused_slot_ignores_its_previous_contents() -> None:
    long_prompt, short_prompt = prompts_of_lengths([60, 5], seed=2)
    model = tiny_model(max_batch_size=2)
    decode_alone(model, long_prompt, STEPS, slot=1)  # fills slot 1 up to position 71, then is "freed"
    reused, reused_logits = decode_alone(model, short_prompt, STEPS, slot=1)
    fresh, fresh_logits = decode_alone(tiny_model(max_batch_size=1), short_prompt, STEPS)
    assert reused == fresh
    torch.testing.assert_close(reused_logits, fresh_logits, atol=1e-5, rtol=0)


def test_reused_slot_next_to_a_running_request() -> None:
    """A new request takes a freed slot while another keeps decoding in the same batch."""
    first, second, third = prompts_of_lengths([30, 6, 9], seed=3)
    model = tiny_model(max_batch_size=2)
    decode_batched(model, [first, second], [0, 1], STEPS)  # both slots now full of old keys
    batched, _ = decode_batched(model, [third, first], [1, 0], STEPS)  # slot 1 reused by `third`
    assert batched[0] == decode_alone(tiny_model(max_batch_size=1), third, STEPS)[0]
    assert batched[1] == decode_alone(tiny_model(max_batch_size=1), first, STEPS)[0]


def test_real_model_batched_matches_alone(smollm2_path: Path) -> None:
    """SmolLM2 in float32: three prompts together in slots 0-2, each alone in an untouched slot 3-5."""
    model = load_weights(smollm2_path, max_batch_size=6, max_seq_len=64).model
    prompts = [GOLDEN_PROMPT, GOLDEN_PROMPT[:9], GOLDEN_PROMPT[3:]]
    with one_thread():
        batched, _ = decode_batched(model, prompts, [2, 0, 1], 5)
        alone = [decode_alone(model, prompt, 5, slot=3 + row)[0] for row, prompt in enumerate(prompts)]
    for row in range(len(prompts)):
        assert batched[row] == alone[row], f"row {row}"
    assert batched[0][:5] == [504, 3575, 282, 4649, 314]  # default-model.md golden tokens


def gathers(model: Transformer, *args: torch.Tensor, kv_len: int) -> tuple[int, torch.Tensor]:
    """(how many times the forward gathered keys or values by slot (llamaserve::read_slots), its logits)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = model(*args, kv_len=kv_len)
    return sum(event.name == "llamaserve::read_slots" for event in prof.events()), logits


def test_rows_on_consecutive_slots_read_their_keys_in_place_with_the_gathered_bits() -> None:
    """One stream in slot 3, or rows on slots 2..4, read views of those slots instead of gathering copies
    (a quarter of a one-row step); what they read and write is what the gathered path reads and writes."""
    torch.manual_seed(0)
    in_place, gathered = tiny_model(max_batch_size=6), tiny_model(max_batch_size=6)
    prompts = {slot: [(7 * slot + i) % 200 + 1 for i in range(5 + 3 * slot)] for slot in range(6)}
    for model in (in_place, gathered):
        for slot, prompt in prompts.items():
            model(torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([slot]))
    for rows in ([3], [2, 3, 4]):
        slots = torch.tensor(rows)
        tokens = torch.tensor([[11 + r] for r in rows])
        positions = torch.tensor([[len(prompts[r])] for r in rows])
        kv_len = int(positions.max()) + 1
        calls, got = gathers(in_place, tokens, positions, slots, kv_len=kv_len)
        with torch.inference_mode():
            expected = gathered.run(tokens, positions, slots, kv_len)  # run() takes slots as given: a gather
        assert calls == 0 and torch.equal(got, expected)
    for layer_a, layer_b in zip(in_place.layers, gathered.layers):
        assert torch.equal(layer_a.attention.cache.k, layer_b.attention.cache.k)
        assert torch.equal(layer_a.attention.cache.v, layer_b.attention.cache.v)
    calls, _ = gathers(in_place, torch.tensor([[5], [6]]), torch.tensor([[9], [20]]), torch.tensor([1, 4]), kv_len=21)
    assert calls == 2 * len(in_place.layers)  # slots 1 and 4 are not a run: keys and values gathered in every layer


def resident_mb() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) // 1024


def test_the_cache_takes_memory_only_where_positions_are_written() -> None:
    """A 1 GiB cache is zeros that cost nothing until written (an anonymous map, not torch.zeros, which
    wrote every byte at start-up), reads as zeros, and holds what is written, in float32 and bfloat16."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc/self/status to read the resident memory from")
    before = resident_mb()
    cache = KVCache(64, 4096, 4, 256, torch.float32)  # 1 GiB of keys, 1 GiB of values
    assert resident_mb() - before < 64, "the cache was written at allocation"
    assert cache.k.shape == (64, 4, 4096, 256) and cache.v.dtype == torch.float32
    assert not cache.v[63, 3, 4000:].any() and not cache.k[0, 0, :8].any()
    cache.k[7, 2, 100] = 1.5
    assert cache.k[7, 2, 100].eq(1.5).all() and cache.k[7, 2, 96:104].sum() == 1.5 * 256
    assert resident_mb() - before < 256
    half = KVCache(2, 64, 2, 16, torch.bfloat16)
    half.v[1, 1, 63] = 2.0
    assert half.v.dtype == torch.bfloat16 and half.v.sum() == 32.0
