"""Batch invariance: a request's tokens and logprobs are the same bits alone and in any crowd.

Bit equality, not closeness: these hold by construction (model/invariance.py), on every CPU, so any
difference is a bug. The crowds differ from "alone" in every way the engine can vary: batch size,
slot, the longest row's key length (across a 512-key block), a prompt prefilling in the same step,
an earlier occupant of the slot, and other rows asking for top-k/top-p candidates.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import Engine, GenerationOutput, GenerationRequest
from model import quant
from model.checkpoint import load_model
from model.invariance import (
    KV_BLOCK,
    TiledLinear,
    head_logits,
    head_tiles,
    make_batch_invariant,
    packed_prefill_inputs,
    prefill_rows_independent,
    row_tile,
    tiled_linear,
)
from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer
from tests.support.engine import collect, run
from tests.support.models import tiny_model

# ---------------------------------------------------------------- model level (tiny random model)


def invariant_tiny(max_batch_size: int = 6, max_seq_len: int = 1100, int4: bool = False) -> Any:
    model = tiny_model(max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    if int4:
        quant.quantize_int4(model, max_rows=2, dense_dtype=None)  # dense above 2 rows: the old batch dependence
    make_batch_invariant(model)
    model.setup_cache(max_batch_size, max_seq_len, batch_invariant=True)
    return model


def prefill(model: Any, prompt: list[int], slot: int) -> int:
    """One prompt per forward, as the engine does; returns its greedy next token."""
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([slot]))
    return int(logits[0].argmax())


def decode_rows(model: Any, rows: list[tuple[list[int], int]], steps: int) -> list[list[torch.Tensor]]:
    """Prefill each (prompt, slot), then decode all rows together greedily; each row's logits per step."""
    tokens = [prefill(model, prompt, slot) for prompt, slot in rows]
    lengths = [len(prompt) for prompt, _ in rows]
    slots = torch.tensor([slot for _, slot in rows])
    out: list[list[torch.Tensor]] = [[] for _ in rows]
    for _ in range(steps):
        logits = model(torch.tensor(tokens)[:, None], torch.tensor(lengths)[:, None], slots)
        for i in range(len(rows)):
            out[i].append(logits[i].clone())
        tokens = logits.argmax(-1).tolist()
        lengths = [n + 1 for n in lengths]
    return out


@pytest.mark.parametrize("int4", [False, True], ids=["dense-fp32", "int4"])
def test_decode_logits_are_the_same_bits_alone_and_in_any_batch(int4: bool) -> None:
    if int4 and not quant.int4_kernel_available():
        pytest.skip("this CPU/torch has no vectorised int4 kernel; the int4 path is never chosen here")
    generator = torch.Generator().manual_seed(1)
    target = torch.randint(0, 259, (37,), generator=generator).tolist()
    others = [torch.randint(0, 259, (n,), generator=generator).tolist() for n in (5, 700, 90, 260, 12)]

    model = invariant_tiny(int4=int4)
    alone = decode_rows(model, [(target, 0)], steps=4)[0]
    # An earlier occupant of slot 3 wrote 700 positions there first.
    decode_rows(model, [(others[1], 3)], steps=1)
    crowd = [(others[0], 0), (others[1], 1), (others[2], 2), (target, 3), (others[3], 4), (others[4], 5)]
    together = decode_rows(model, crowd, steps=4)[3]
    pair = decode_rows(model, [(others[2], 1), (target, 5)], steps=4)[1]
    assert max(len(p) for p, _ in crowd) + 4 > KV_BLOCK, "the crowd must need a second key block"
    for step, (a, b, c) in enumerate(zip(alone, together, pair)):
        assert torch.equal(a, b), f"step {step}: alone vs batch of 6 differ by {(a - b).abs().max():.3g}"
        assert torch.equal(a, c), f"step {step}: alone vs batch of 2 differ by {(a - c).abs().max():.3g}"


def test_packed_prefill_rows_get_the_bits_of_their_own_forwards() -> None:
    """Several prompts' chunks in one forward (left-padded: model/invariance.packed_prefill_inputs) give each
    row the keys, values and last logits of its chunk alone -- next to longer and shorter rows, and with
    another row's keys past a 512-key block. Not by construction: the engine packs only where
    `prefill_rows_independent` found it so on this machine, so that verdict must predict these cases."""
    model = invariant_tiny()
    independent = prefill_rows_independent(model)
    generator = torch.Generator().manual_seed(2)
    long, short, middle = (torch.randint(0, 259, (n,), generator=generator).tolist() for n in (650, 40, 130))
    slots = [1, 2, 4]
    chunks = [(long[600:], 600), (short, 0), (middle[100:], 100)]  # long's keys need a second block

    def keys_and_logits(packed: bool) -> list[torch.Tensor]:
        for prompt, slot, n in ((long, 1, 600), (middle, 4, 100)):  # the cached prefixes, each alone
            model(torch.tensor([prompt[:n]]), torch.arange(n)[None], torch.tensor([slot]))
        if packed:
            tokens, positions = packed_prefill_inputs(chunks, model.scratch_position)
            logits = model(tokens, positions, torch.tensor(slots), kv_len=650)
        else:
            alone = [
                (torch.tensor([ids]), torch.arange(at, at + len(ids))[None], torch.tensor([slot]))
                for (ids, at), slot in zip(chunks, slots)
            ]
            logits = torch.cat([model(*row) for row in alone])
        caches = [layer.attention.cache for layer in model.layers]
        held = [c.k[slot, :, : at + len(ids)].clone() for (ids, at), slot in zip(chunks, slots) for c in caches]
        return [logits, *held]

    alone, together = keys_and_logits(False), keys_and_logits(True)
    assert len(alone) == len(together) == 1 + 3 * len(model.layers)
    same = all(torch.equal(a, b) for a, b in zip(alone, together))
    assert same or not independent, "the check passed, yet packed rows differ from their own forwards"
    engine = Engine(model, ByteTokenizer(), max_batch_size=6, max_seq_len=1100)
    engine.start()
    engine.shutdown()
    assert engine.runner.pack_prefill == independent, "the engine packs exactly where the check passed"


def test_decode_key_block_is_one_whose_masked_keys_change_nothing() -> None:
    """llama.decode_key_block picks the smallest block whose trailing masked keys change no bit (checked at load
    on random data); here on other data, more rows, and every multiple up to 10 blocks."""
    from model.decode_attention import DECODE_KEY_BLOCKS, decode_attention, decode_key_block

    block = decode_key_block(4, 2, 16, torch.float32, "cpu")
    assert block in (*DECODE_KEY_BLOCKS, KV_BLOCK)
    generator = torch.Generator().manual_seed(9)
    q = torch.randn(5, 4, 1, 16, generator=generator)
    keys, values = (torch.randn(5, 2, 10 * block, 16, generator=generator) for _ in range(2))
    lengths = torch.tensor([1, block, block - 1, 7, block // 3])
    outputs = []
    for blocks in range(1, 11):
        mask = (torch.arange(blocks * block)[None] < lengths[:, None])[:, None, None]
        outputs.append(decode_attention(q, keys[:, :, : blocks * block], values[:, :, : blocks * block], mask))
    assert all(torch.equal(out, outputs[0]) for out in outputs)
    assert invariant_tiny().decode_key_block == block


@pytest.mark.parametrize("shape", [(300, 96), (64, 64), (1536, 576), (576, 1536), (49152, 576)])
def test_tiled_linear_rows_do_not_depend_on_the_rest_of_the_tile(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(*shape) * 0.05, torch.randn(shape[0])
    tile = row_tile(weight, bias)
    x = torch.randn(3 * tile + 1, 1, shape[1])
    alone = torch.cat([tiled_linear(x[i : i + 1], weight, bias, tile) for i in range(x.shape[0])])
    assert torch.equal(tiled_linear(x, weight, bias, tile), alone)
    assert torch.allclose(alone, torch.nn.functional.linear(x, weight, bias), atol=1e-3)


@pytest.mark.parametrize("shape", [(259, 64), (49152, 576)])
def test_head_logits_rows_do_not_depend_on_the_batch(shape: tuple[int, int]) -> None:
    """The decode head in column tiles, the tile following the batch size: each row's logits are the bits it
    gets alone, at any batch size, whichever of the agreeing tiles serves it."""
    torch.manual_seed(0)
    weight = torch.randn(*shape) * 0.05
    tiles = head_tiles(weight)
    if not tiles:  # no candidate passes on this CPU: the model uses tiled_linear, tested above
        assert row_tile(weight) >= 1
        return
    x = torch.randn(2 * tiles[-1] + 3, shape[1])
    alone = torch.cat([head_logits(x[i : i + 1], weight, tiles) for i in range(x.shape[0])])
    for rows in sorted({2, *tiles, *(t + 1 for t in tiles), x.shape[0]}):
        assert torch.equal(head_logits(x[:rows], weight, tiles), alone[:rows]), f"{rows} rows"
    for tile in tiles:  # each tile alone gives those bits too
        assert torch.equal(head_logits(x, weight, (tile,)), alone), f"tile {tile}"
    assert torch.allclose(alone, torch.nn.functional.linear(x, weight), atol=1e-3)


def test_make_batch_invariant_swaps_dense_layers_and_flags_int4_ones() -> None:
    model = tiny_model()
    if quant.int4_kernel_available():
        quant.quantize_int4(model, max_rows=2, dense_dtype=None)
    model.layers[0].feed_forward.w2 = torch.nn.Linear(128, 64, bias=False)  # a layer left dense
    make_batch_invariant(model)
    assert isinstance(model.layers[0].feed_forward.w2, TiledLinear)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert all(m.batch_invariant for m in model.modules() if isinstance(m, quant.Int4Linear))


def test_cache_holds_whole_key_blocks_and_served_context_is_unchanged() -> None:
    model = invariant_tiny(max_seq_len=700)
    assert model.max_seq_len == 700 and model.cache_len == 2 * KV_BLOCK
    with pytest.raises(ValueError):  # the extra cache positions are not usable context
        model(torch.tensor([[1]]), torch.tensor([[700]]))


# ---------------------------------------------------------------- engine level (the default model)

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Then the dog",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
]


@pytest.fixture(scope="module", params=["auto", "none"], ids=["default-quantization", "float32"])
def loaded(request: Any, smollm2_path: Path) -> Any:
    return load_model(smollm2_path, max_batch_size=8, max_seq_len=1024, quantization=request.param)


def requests_for(loaded: Any) -> list[GenerationRequest]:
    tok = loaded.tokenizer
    out = []
    for i, text in enumerate(PROMPTS):
        ids = tok.encode(text)
        out.append(GenerationRequest(ids, SamplingParams(temperature=0.0, logprobs=5), max_tokens=8, prompt_logprobs=True))
        out.append(
            GenerationRequest(ids, SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7 + i, logprobs=2), max_tokens=8)
        )
    return out


def crowd_for(loaded: Any) -> list[GenerationRequest]:
    """Other traffic: a long prompt (a second key block, prefill beside the decodes), short ones,
    and rows asking for many top-k candidates."""
    tok = loaded.tokenizer
    long_prompt = tok.encode(" ".join(f"item {i} is on shelf {i % 7};" for i in range(55)))
    assert len(long_prompt) > KV_BLOCK
    return [
        GenerationRequest(long_prompt, SamplingParams(temperature=0.0), max_tokens=12),
        GenerationRequest(tok.encode("Once upon a time"), SamplingParams(temperature=1.0, top_k=1000), max_tokens=20),
        GenerationRequest(tok.encode("1, 2, 3,"), SamplingParams(temperature=0.7, top_p=0.5, seed=3), max_tokens=20),
        GenerationRequest(tok.encode("Hello"), SamplingParams(temperature=0.0, logprobs=3), max_tokens=30),
    ]


def summary(outputs: list[GenerationOutput]) -> dict[str, Any]:
    """Everything a client can see of a request's numbers."""
    first = outputs[0].prompt_logprobs or []
    return {
        "ids": [t for o in outputs for t in o.token_ids],
        "text": "".join(o.text for o in outputs),
        "logprobs": [(lp.token_id, lp.logprob, lp.top) for o in outputs for lp in (o.logprobs or [])],
        "prompt_logprobs": [None if lp is None else (lp.token_id, lp.logprob, lp.top) for lp in first],
        "finish": outputs[-1].finish_reason,
    }


def test_requests_alone_and_among_others_give_the_same_bits(loaded: Any) -> None:
    assert loaded.model.batch_invariant
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=8, max_seq_len=1024)
    engine.start()
    try:
        requests = requests_for(loaded)

        async def alone() -> list[dict[str, Any]]:
            return [summary(await collect(engine.submit(r))) for r in requests]

        async def together() -> list[dict[str, Any]]:
            crowd = [engine.submit(r) for r in crowd_for(loaded)]  # they take the low slots first
            await asyncio.sleep(0.05)
            handles = [engine.submit(r) for r in requests]
            results = await asyncio.gather(*(collect(h) for h in handles + crowd))
            return [summary(r) for r in results[: len(handles)]]

        solo = run(alone(), timeout=300)
        crowded = run(together(), timeout=300)
    finally:
        engine.shutdown()
    assert max(engine.step_batch_sizes) >= 6, "the crowd must really share decode steps"
    for i, (a, b) in enumerate(zip(solo, crowded)):
        assert a == b, f"request {i} ({requests[i].sampling}) changed in a crowd"
