"""The fixed-shape decode step (model/static_step.py): same logits as the eager forward, padding rows
that touch no one's keys, one graph per bucket with no graph break, the same bits for a row alone
and in any batch, and an eager fallback that says why.

Most tests trace with the `aot_eager` backend (dynamo capture and the fixed shapes, no C++ build:
Inductor takes seconds per bucket on two cores); `test_inductor_*` compile for real.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import model.static_step as static_step
from app.engine import Engine, GenerationRequest
from model.invariance import KV_BLOCK, make_batch_invariant, round_up
from model.sampling import SamplingParams
from model.static_step import StaticStep, batch_buckets, run_stack
from model.tokenizer import ByteTokenizer
from tests.support.engine import collect, prompt, run
from tests.support.models import tiny_model


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()  # each test compiles and counts its own graphs
    torch._dynamo.utils.counters.clear()


def invariant_tiny(max_batch_size: int = 6, max_seq_len: int = 600) -> Any:
    model = tiny_model(max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    make_batch_invariant(model)
    model.setup_cache(max_batch_size, max_seq_len, batch_invariant=True)
    return model


def fill(model: Any, slot: int, tokens: list[int]) -> None:
    """Prefill `tokens` into a slot (eager, one prompt per forward as the engine does)."""
    model(torch.tensor([tokens]), torch.arange(len(tokens))[None], torch.tensor([slot]))


def test_batch_buckets_are_powers_of_two_then_the_slot_count() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]


def cache_gathers(prof: torch.profiler.profile) -> int:
    """index_select calls on a (slots, heads, positions, head_dim) cache: keys or values gathered by slot
    (llamaserve::read_slots; a compiled graph runs it without its own profiler event)."""
    return sum(e.name == "aten::index_select" and len(e.input_shapes[0]) == 4 for e in prof.events())


@pytest.mark.parametrize(
    "rows, way",
    [
        ([0, 1, 2], "in place"),
        ([2, 3, 4], "in place"),
        ([0, 2, 3], "in place"),
        ([4, 1, 3], "in place"),
        ([5, 3, 4], "in place"),
        ([5, 0, 3], "wider bucket"),
        ([5, 0, 3], "gathered"),
    ],
    ids=[
        "slots-in-place",
        "slots-from-2-in-place",
        "window-with-a-hole",
        "window-unordered",
        "window-at-the-end",
        "spread-rows-in-a-wider-bucket",
        "spread-rows-gathered-as-on-an-accelerator",
    ],
)
def test_decode_matches_the_eager_forward_and_padding_touches_no_keys(rows: list[int], way: str) -> None:
    """3 rows make a bucket of 4. Rows inside 4 consecutive slots read their keys in place, padding rows
    filling the other slots of that window (behind the rows, or in a hole between them); rows spread
    wider run in place in the next bucket whose window holds them (here all 6 slots); an accelerator,
    which cannot look at the slots, gathers them. Either way: the eager forward's logits, and no
    readable key touched."""
    eager, fixed = invariant_tiny(), invariant_tiny()
    step = StaticStep(fixed, backend="aot_eager")
    prompts = [prompt(i, n) for i, n in enumerate((5, 30, 9, 520, 3, 12))]
    for model in (eager, fixed):
        for slot, tokens in enumerate(prompts):
            fill(model, slot, tokens)
    tokens = torch.tensor([[7], [8], [9]])
    positions = torch.tensor([[len(prompts[s])] for s in rows])
    slots = None if rows == [0, 1, 2] else torch.tensor(rows)
    kv_len = int(positions.max()) + 1
    with torch.inference_mode():
        expected = eager.run(tokens, positions, slots, eager.check_inputs(tokens, positions, slots, kv_len))  # gathered
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        if way == "gathered":  # what __call__ does with slots in device memory
            got = step._padded(tokens, positions, slots, 4, round_up(kv_len, fixed.decode_key_block))
        else:
            got = step(tokens, positions, slots, kv_len=kv_len)
    assert cache_gathers(prof) == (2 * len(fixed.layers) if way == "gathered" else 0)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for layer_eager, layer_fixed in zip(eager.layers, fixed.layers):
        cache_e, cache_f = layer_eager.attention.cache, layer_fixed.attention.cache
        readable = slice(0, fixed.cache_len)  # the scratch position past it is the padding rows' to write
        torch.testing.assert_close(cache_f.k[:, :, readable], cache_e.k[:, :, readable], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache_f.v[:, :, readable], cache_e.v[:, :, readable], rtol=1e-5, atol=1e-5)


def test_prefill_and_all_logits_run_eagerly_with_the_same_result() -> None:
    eager, fixed = invariant_tiny(), invariant_tiny()
    step = StaticStep(fixed, backend="aot_eager")
    tokens = torch.tensor([prompt(1, 17)])
    positions = torch.arange(17)[None]
    torch.testing.assert_close(step(tokens, positions, torch.tensor([2])), eager(tokens, positions, torch.tensor([2])))
    assert step.compiled is not None and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_one_graph_per_bucket_and_way_of_reading_keys_and_no_graph_break() -> None:
    model = invariant_tiny(max_batch_size=4)
    layers = list(model.layers)
    h = torch.randn(2, 1, 64)
    cos, sin = (
        model.rope_cos[torch.zeros(2, 1, dtype=torch.long)][:, None],
        model.rope_sin[torch.zeros(2, 1, dtype=torch.long)][:, None],
    )
    positions = torch.zeros(2, 1, dtype=torch.long)
    mask = torch.ones(2, 1, 1, KV_BLOCK, dtype=torch.bool)
    windows = [None] * len(layers)
    with torch.inference_mode():
        explained = torch._dynamo.explain(run_stack)(layers, h, cos, sin, torch.tensor([1, 3]), positions, mask, windows, windows)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    # The block is one nested region, traced once and called for every layer.
    graph = explained.graphs[0]
    calls = [node for node in graph.graph.nodes if node.op == "call_function" and "invoke_subgraph" in str(node.target)]
    assert len(calls) == len(layers) and len({node.args[0].target for node in calls}) == 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = StaticStep(model, backend="aot_eager")
    step.warm_up()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # Keys in place (on the CPU nothing is gathered): one graph for one row, one for the larger buckets,
    # here one more because the invariant tiny model's GEMMs pad rows to tiles of 4 (invariance.tiled_linear).
    assert graphs <= len(step.buckets)
    for rows, kv_len in [(1, 1), (3, 200), (4, 513), (2, 600)]:  # any bucket, any key length: no new graph
        step(torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), kv_len - 1), None, kv_len=kv_len)
    # Rows on slots from any first one, in a window (holes and all) or spread into a wider one: no new graph.
    for slots in ([3], [1, 2], [2, 3], [0, 2, 3], [3, 1], [0, 3]):
        rows = len(slots)
        step(torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), 9), torch.tensor(slots), kv_len=10)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_one_graph_for_one_row_and_one_for_every_larger_bucket() -> None:
    """The row count is a dynamic dimension of the graph above one row: compiling six buckets cost as
    much as compiling two (start-up), where nothing in the step branches on the row count."""
    step = StaticStep(tiny_model(max_batch_size=8), backend="aot_eager")
    step.warm_up()
    assert step.buckets == [1, 2, 4, 8] and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_warm_up_covers_longer_keys_without_batch_invariance() -> None:
    """Without batch invariance keys are read one at a time (decode_key_block 1); warming up on a key length
    of 1 specialised the graphs to it, and the first real step compiled again (seconds, mid-serving)."""
    model = tiny_model(max_batch_size=4)
    assert model.decode_key_block == 1
    step = StaticStep(model, backend="aot_eager")
    step.warm_up()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for rows in (1, 2, 4):
        step(torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), 5), None, kv_len=6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_models_alike_in_their_tensors_never_share_a_graph() -> None:
    """The compiled block keeps only tensor and global guards (static_step.keep_guard), so a Python constant
    such as RMSNorm's eps is no longer checked on each call; each step compiles its own copy of run_block,
    so a second model of the same shapes with another eps gets its own graphs, not the first one's."""
    sharp, smooth = tiny_model(max_batch_size=2), tiny_model(max_batch_size=2)
    for module in smooth.modules():
        if hasattr(module, "eps"):
            module.eps = 0.5  # same tensors, other arithmetic
    steps = [StaticStep(m, backend="aot_eager") for m in (sharp, smooth)]
    tokens, positions = torch.tensor([[3]]), torch.tensor([[4]])
    for model, step in zip((sharp, smooth), steps):
        fill(model, 0, prompt(1, 4))
        with torch.inference_mode():
            expected = model(tokens, positions, torch.tensor([0]))
        torch.testing.assert_close(step(tokens, positions, torch.tensor([0])), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steps[0](tokens, positions, torch.tensor([0])), steps[1](tokens, positions, torch.tensor([0])))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(backend: str) -> None:
    """Batch invariance through the compiled step (here: Inductor's fused kernels too)."""
    model = invariant_tiny(max_batch_size=6)
    step = StaticStep(model, backend=backend)
    target = prompt(9, 40)
    others = [prompt(i, n) for i, n in enumerate((5, 560, 90, 260, 12))]

    def decode(rows: list[tuple[list[int], int]]) -> torch.Tensor:
        for tokens, slot in rows:
            fill(model, slot, tokens)
        positions = torch.tensor([[len(t)] for t, _ in rows])
        slots = [s for _, s in rows]
        slot_tensor = None if slots == list(range(len(slots))) else torch.tensor(slots)
        return step(torch.tensor([[5]] * len(rows)), positions, slot_tensor, kv_len=int(positions.max()) + 1)

    alone = decode([(target, 0)])[0]
    crowds = [
        [(target, 0), (others[0], 1), (others[1], 2)],  # in place, bucket 4, a second key block
        [(others[2], 1), (target, 5)],  # spread: 2 rows in bucket 6's window
        [(others[0], 0), (others[1], 1), (others[2], 2), (target, 3), (others[3], 4), (others[4], 5)],  # bucket 6
    ]
    for crowd in crowds:
        index = [t for t, _ in crowd].index(target)
        together = decode(crowd)[index]
        assert torch.equal(together, alone), f"{len(crowd)} rows: differ by {(together - alone).abs().max():.3g}"
    assert step.fallback_reason is None


def test_no_compiler_falls_back_to_eager_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(static_step.shutil, "which", lambda name: None)
    model = invariant_tiny(max_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="model.static_step"):
        step = StaticStep(model)
    assert step.compiled is None and "no C++ compiler" in (step.fallback_reason or "")
    assert "decode step runs eagerly: no C++ compiler" in caplog.text
    fill(model, 0, [1, 2, 3])
    out = step(torch.tensor([[4]]), torch.tensor([[3]]), None, kv_len=4)
    assert out.shape == (1, model.vocab_size) and torch.isfinite(out).all()


def test_a_failing_backend_falls_back_to_eager_and_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    def broken_backend(graph: Any, example_inputs: Any) -> Any:
        raise RuntimeError("backend exploded")

    eager, fixed = invariant_tiny(max_batch_size=2), invariant_tiny(max_batch_size=2)
    step = StaticStep(fixed, backend=broken_backend)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="model.static_step"):
        got = step(torch.tensor([[4]]), torch.tensor([[0]]), None, kv_len=1)
    assert step.compiled is None and "backend exploded" in (step.fallback_reason or "")
    torch.testing.assert_close(got, eager(torch.tensor([[4]]), torch.tensor([[0]]), None, kv_len=1))


def test_compile_off_keeps_the_fixed_shapes_eagerly() -> None:
    step = StaticStep(invariant_tiny(max_batch_size=2), compile=False)
    assert step.compiled is None and step.fallback_reason == "turned off (--no-compile)"
    assert step.warm_up() >= 0 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_inductor_engine_requests_alone_and_together_give_the_same_tokens() -> None:
    """The server's path: an Engine over StaticStep (Inductor), warmed up on its own thread at start."""
    model = invariant_tiny(max_batch_size=4, max_seq_len=128)
    step = StaticStep(model)
    engine = Engine(step, ByteTokenizer(), max_batch_size=4, max_seq_len=128)  # type: ignore[arg-type]
    engine.start()
    greedy = SamplingParams(temperature=0, logprobs=2)

    async def generate(prompts: list[list[int]]) -> list[list[Any]]:
        import asyncio

        handles = [
            engine.submit(GenerationRequest(prompt_ids=p, sampling=greedy, max_tokens=12, ignore_eos=True)) for p in prompts
        ]
        outputs = await asyncio.gather(*(collect(h) for h in handles))
        return [[(t, lp.logprob) for o in out for t, lp in zip(o.token_ids, o.logprobs or [])] for out in outputs]

    try:
        prompts = [prompt(i, n) for i, n in enumerate((7, 33, 2))]
        alone = run(generate([prompts[1]]), timeout=300)[0]
        together = run(generate(prompts), timeout=300)[1]
    finally:
        engine.shutdown()
    assert len(alone) == 12 and together == alone
    assert step.fallback_reason is None


def test_every_bucket_keeps_its_graphs_when_warmed_up_on_another_thread() -> None:
    """The engine warms up on its own thread, where dynamo's (per-thread) recompile limit is 8 again:
    32 slots make 6 graphs, and none may fall back to eager: rows on any slots then compile nothing."""
    import threading

    step = StaticStep(invariant_tiny(max_batch_size=32, max_seq_len=64), backend="aot_eager")
    worker = threading.Thread(target=step.warm_up)
    worker.start()
    worker.join()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(step.buckets) == 6
    for slots in ([31], [0, 31], [3, 9, 17], list(range(0, 32, 2)), list(range(1, 32))):
        rows = len(slots)
        step(torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), 5), torch.tensor(slots), kv_len=6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 6 and step.fallback_reason is None


def test_inductor_decode_rows_get_the_same_bits_whatever_key_length_the_batch_reads() -> None:
    """Decode reads keys in multiples of the model's decode_key_block, up to what the batch's longest row
    needs: the compiled step gives a short row the same logits alone (one block) and beside rows that need
    two or five (the masked keys are a dynamic dimension of one graph)."""
    model = invariant_tiny(max_batch_size=2, max_seq_len=600)
    block = model.decode_key_block
    step = StaticStep(model)
    generator = torch.Generator().manual_seed(4)
    short = torch.randint(0, 259, (1, 20), generator=generator)

    def decode_short(beside: int | None) -> torch.Tensor:
        model(short, torch.arange(20)[None], torch.tensor([0]))
        if beside is None:
            return step(torch.tensor([[7]]), torch.tensor([[20]]), torch.tensor([0]))[0]
        other = torch.randint(0, 259, (1, beside), generator=generator)
        model(other, torch.arange(beside)[None], torch.tensor([1]))
        return step(torch.tensor([[7], [9]]), torch.tensor([[20], [beside]]), torch.tensor([0, 1]))[0]

    _, wrappers = run_and_get_code(decode_short, None)  # the first call compiles: its generated wrapper
    alone = decode_short(None)
    for beside in (block + 5, min(5 * block - 3, 599)):
        assert torch.equal(decode_short(beside), alone), f"beside a row of {beside} keys"
    assert step.fallback_reason is None
    # The tensor guards check sizes and strides once per call; the wrapper does not check them again.
    assert wrappers and not any("assert_size_stride(" in code or "assert_alignment(" in code for code in wrappers)


def test_a_request_moved_to_bring_the_decode_rows_together_keeps_its_bits_and_its_sampling_state() -> None:
    """A, B, C take slots 0, 1, 2; B ends after two tokens, leaving rows on slots 0 and 2, wider than their
    bucket of 2: the scheduler moves C into slot 1 with its keys, seed and penalty counts. Every token and
    logprob is what each request gets alone."""
    greedy = SamplingParams(temperature=0, logprobs=2)
    seeded = SamplingParams(temperature=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.3, logprobs=2)
    requests = [
        GenerationRequest(prompt_ids=prompt(1, 20), sampling=greedy, max_tokens=24, ignore_eos=True),
        GenerationRequest(prompt_ids=prompt(2, 9), sampling=greedy, max_tokens=2, ignore_eos=True),
        GenerationRequest(prompt_ids=prompt(3, 30), sampling=seeded, max_tokens=20, ignore_eos=True),
    ]

    def serve(batch: list[GenerationRequest]) -> tuple[list[list[tuple[int, float]]], list[tuple[int, int, int]]]:
        step = StaticStep(invariant_tiny(max_batch_size=4, max_seq_len=128), backend="aot_eager")
        copies: list[tuple[int, int, int]] = []
        copy_prefix = step.copy_prefix
        step.copy_prefix = lambda s, t, n: (copies.append((s, t, n)), copy_prefix(s, t, n))[1]  # type: ignore[method-assign]
        engine = Engine(step, ByteTokenizer(), max_batch_size=4, max_seq_len=128)  # type: ignore[arg-type]
        engine.start()

        async def generate() -> list[list[tuple[int, float]]]:
            import asyncio

            outputs = await asyncio.gather(*(collect(engine.submit(r)) for r in batch))
            return [[(t, lp.logprob) for o in out for t, lp in zip(o.token_ids, o.logprobs or [])] for out in outputs]

        try:
            return run(generate(), timeout=300), copies
        finally:
            engine.shutdown()

    together, copies = serve(requests)
    assert copies == [(2, 1, 31)]  # C, 30 prompt tokens and its first token's keys, after B ended
    for request, got in zip(requests, together):
        (alone,), _ = serve([request])
        assert len(got) == request.max_tokens and got == alone
