"""Tensor parallelism (model/tensor_parallel.py): the shard plan, and 2 gloo ranks against one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench.ranks import run_ranks
from model.args import ModelArgs
from model.tensor_parallel import ShardPlan, device_for_rank, split_evenly
from tests.support.parallel import compare_with_single_process, write_tiny_checkpoints


def args(heads: int, kv_heads: int, hidden: int = 128, head_dim: int = 16) -> ModelArgs:
    return ModelArgs(dim=heads * head_dim, n_layers=1, n_heads=heads, n_kv_heads=kv_heads, vocab_size=32, hidden_dim=hidden)


def test_split_evenly_covers_every_item_once_first_parts_larger() -> None:
    assert [split_evenly(9, 2, i) for i in range(2)] == [(0, 5), (5, 9)]
    assert [split_evenly(3, 3, i) for i in range(3)] == [(0, 1), (1, 2), (2, 3)]


def test_smollm2_shape_splits_unevenly_by_kv_group() -> None:
    """9 query heads over 3 KV heads on 2 ranks: a rank holds whole groups (6 + 3), never half of one."""
    plans = [ShardPlan.build(args(9, 3, hidden=1536, head_dim=64), rank, 2) for rank in range(2)]
    assert [(p.kv_heads, p.q_heads, p.hidden) for p in plans] == [((0, 2), (0, 6), (0, 768)), ((2, 3), (6, 9), (768, 1536))]


def test_fewer_kv_heads_than_ranks_replicates_each_kv_head() -> None:
    """Llama-3-8B's shape (32 / 8) on 16 ranks: two ranks per KV head, each with half its query heads."""
    plans = [ShardPlan.build(args(32, 8), rank, 16) for rank in range(16)]
    assert [p.kv_heads for p in plans[:4]] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [p.q_heads for p in plans[:4]] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert sum(p.q_heads[1] - p.q_heads[0] for p in plans) == 32


@pytest.mark.parametrize("heads,kv_heads,world", [(8, 2, 3), (4, 4, 8), (6, 2, 4)])
def test_shapes_that_do_not_split_are_refused_with_the_counts(heads: int, kv_heads: int, world: int) -> None:
    with pytest.raises(ValueError, match=f"{heads} query heads .* {kv_heads} KV heads .* {world} ranks"):
        ShardPlan.build(args(heads, kv_heads), 0, world)


def test_feed_forward_splits_on_int4_group_boundaries() -> None:
    """A Q4_1 group (32 columns) never straddles two ranks, so a quantized file stays exact per shard."""
    plans = [ShardPlan.build(args(4, 2, hidden=32 * 5), rank, 2) for rank in range(2)]
    assert [p.hidden for p in plans] == [(0, 96), (96, 160)]


def test_shards_put_back_together_are_the_full_tensors() -> None:
    full = args(6, 3, hidden=96)
    plans = [ShardPlan.build(full, rank, 2) for rank in range(2)]
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "layers.0.attention.wq.weight": (96, 96),
        "layers.0.attention.wq.bias": (96,),
        "layers.0.attention.wk.weight": (48, 96),
        "layers.0.attention.wo.weight": (96, 96),
        "layers.0.attention.wo.bias": (96,),  # no model has one; if it did, it must count once in the sum
        "layers.0.feed_forward.w1.weight": (96, 96),
        "layers.0.feed_forward.w2.weight": (96, 96),
        "layers.0.attention_norm.weight": (96,),
        "tok_embeddings.weight": (32, 96),
    }
    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=gen)
        parts = [plan.shard(name, tensor) for plan in plans]
        split = plans[0].split(name)
        if name.endswith("wo.bias"):
            assert torch.equal(parts[0], tensor) and not parts[1].any()
        elif split is None:
            assert all(part is tensor for part in parts), name
        else:
            assert torch.equal(torch.cat(parts, dim=split[0]), tensor), name
    local = plans[1].local_args(full)
    # 96 feed-forward columns are 3 int4 groups: 2 on rank 0, 1 on rank 1
    assert (local.n_heads, local.n_kv_heads, local.head_dim, local.hidden_dim, local.dim) == (2, 1, 16, 32, 96)


def test_each_rank_takes_its_own_gpu_and_one_named_gpu_is_refused() -> None:
    assert device_for_rank("cuda", 1) == torch.device("cuda", 1)
    assert device_for_rank("cpu", 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="give --device cuda"):
        device_for_rank("cuda:1", 0)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One pair of spawned ranks runs all three checkpoints (a process start costs seconds)."""
    checkpoints = write_tiny_checkpoints(tmp_path_factory.mktemp("tp"))
    return run_ranks(2, compare_with_single_process, checkpoints)[0]


@pytest.mark.parametrize("name", ["llama2", "llama3", "qwen2", "meta"])
def test_two_gloo_ranks_give_the_single_process_logits_and_greedy_tokens(two_rank_results: dict[str, Any], name: str) -> None:
    """Prefill of every position and a decode batch in other slots within 1e-5 (float32; only the order
    of the all-reduce's sums differs), and the same greedy tokens through the engine."""
    result = two_rank_results[name]
    assert result["logit_scale"] > 1  # not vacuous: the logits are far from zero
    assert result["prefill_error"] <= 1e-5 and result["decode_error"] <= 1e-5, result
    assert result["parallel_tokens"] == result["single_tokens"]
    assert result["parallel_cached_tokens"] >= 16  # the repeated prompt's prefix was copied on every rank
    # The row-independence check ran on both ranks in step (a rank stopping early would leave the other
    # in a collective until run_ranks' deadline); its verdict depends on the CPU's GEMM kernels.
    assert all(isinstance(verdict, bool) for verdict in result["rows_independent"])
    assert all(len(tokens) > 0 for tokens in result["single_tokens"])


@pytest.mark.parametrize("n_shards", [1, 2])
def test_a_rank_reads_its_slices_of_a_meta_checkpoint(n_shards: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One shard: merged and sliced per tensor; one shard per rank: shard r is rank r's slice, read alone.
    Either way, the same tensors as slicing the whole checkpoint."""
    from model.meta_weights import read_meta
    from tests.support.meta_checkpoint import write_meta_checkpoint
    from tests.support.oracle import tiny_hf_llama

    path = write_meta_checkpoint(tiny_hf_llama(intermediate=192, scaling_original=8192), tmp_path, n_shards, 0)
    args, full = read_meta(path)
    concatenate = torch.cat
    merged: list[int] = []  # dims of the tensors read_meta concatenates (merges), per rank

    def counting_cat(parts: Any, dim: int = 0) -> torch.Tensor:
        merged.append(dim)
        return concatenate(parts, dim=dim)

    for rank in range(2):
        plan = ShardPlan.build(args, rank, 2)
        assert plan.is_even_split(args)
        merged.clear()
        monkeypatch.setattr(torch, "cat", counting_cat)
        _, sliced = read_meta(path, (rank, 2))
        monkeypatch.setattr(torch, "cat", concatenate)
        # With a shard per rank only the replicated embedding and head are merged; the layers come from shard r.
        assert len(merged) == (2 if n_shards == 2 else 0)
        assert sliced.keys() == full.keys()
        for name, tensor in full.items():
            assert torch.equal(sliced[name], plan.shard(name, tensor)), name
