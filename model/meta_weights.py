"""Meta checkpoint directories: params.json + consolidated.*.pth shards -> one state dict in our layout."""

from __future__ import annotations

from pathlib import Path

import torch

from model.args import ModelArgs
from model.errors import CheckpointError
from model.gguf_weights import unpermute_rotary
from model.tensor_parallel import checkpoint_plan

# How Meta's model-parallel layers split a weight across shards (fairscale): column-parallel along
# dim 0, row-parallel along dim 1; norms are replicated. The embedding is found by shape (Llama 2
# splits it along dim 1, Llama 3 along dim 0).
_META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def read_meta(path: Path, tensor_parallel: tuple[int, int] | None = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Args from params.json and the shards merged into one state dict, Q/K rows in rotate_half order.

    tensor_parallel (rank, world): only this rank's slices (model/tensor_parallel.ShardPlan). One
    tensor is merged and sliced at a time, so a rank never holds the whole model. When the checkpoint
    has one shard per rank and Meta's equal split is this plan's, rank r takes its layers from
    consolidated.r.pth alone, as Meta's `model.py` does.
    """
    shard_files = sorted(path.glob("consolidated.*.pth"))
    if not shard_files:
        raise CheckpointError(f"{path}: params.json found but no consolidated.*.pth weights")
    shards = [torch_load(f) for f in shard_files]
    try:
        args = ModelArgs.from_params_json(path / "params.json", tie_word_embeddings="output.weight" not in shards[0])
    except (OSError, ValueError, TypeError, AttributeError) as e:  # ValueError covers JSONDecodeError
        raise CheckpointError(f"{path / 'params.json'}: {e}") from e
    check_same_tensors(shards, path)
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointError(f"{path}: missing tensor tok_embeddings.weight")
    if args.vocab_size <= 0:  # Llama 2 writes vocab_size -1
        embedding = shards[0]["tok_embeddings.weight"]
        args.vocab_size = int(embedding.shape[0]) * (len(shards) if embedding.shape[1] == args.dim else 1)
    plan = None
    if tensor_parallel is not None:
        plan = checkpoint_plan(args, tensor_parallel, path)
    per_rank = plan is not None and len(shards) == plan.world and plan.is_even_split(args)
    state: dict[str, torch.Tensor] = {}
    for name in list(shards[0]):
        if name == "rope.freqs":  # Llama 2 checkpoints store their rope table; it is recomputed
            continue
        parts = [shard[name] for shard in shards]
        local = per_rank and plan is not None and plan.split(name) is not None
        if local and plan is not None:  # Meta's shard of this rank is exactly our slice
            tensor, heads = parts[plan.rank], plan.local_args(args)
        else:
            split = meta_split_dim(name, parts[0], args.dim)
            tensor = parts[0] if split is None or len(parts) == 1 else torch.cat(parts, dim=split)
            heads = args
        if name.endswith("attention.wq.weight"):
            tensor = unpermute_meta(tensor, heads.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = unpermute_meta(tensor, heads.n_kv_heads)
        state[name] = tensor if plan is None or local else plan.shard(name, tensor)
    return args, state


def unpermute_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> rotate_half halves (same as llama.cpp's layout)."""
    if w.shape[0] % (2 * n_heads):
        raise CheckpointError(f"rotary weight of shape {list(w.shape)} does not split into {n_heads} heads")
    return unpermute_rotary(w, n_heads)


def torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError on bad files
        raise CheckpointError(f"{file}: unreadable checkpoint shard (truncated or corrupt?): {e}") from e


def check_same_tensors(shards: list[dict[str, torch.Tensor]], source: Path) -> None:
    """Every model-parallel shard names the same tensors."""
    names = set(shards[0])
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) != names:
            diff = sorted(set(shard) ^ names)
            raise CheckpointError(f"{source}: shard {i} has different tensors from shard 0: {', '.join(diff[:5])}")


def meta_split_dim(name: str, part: torch.Tensor, dim: int) -> int | None:
    """The dim a shard tensor was split along, or None for replicated tensors (norms)."""
    if part.dim() < 2:
        return None
    if name == "tok_embeddings.weight":  # Llama 2: ParallelEmbedding (dim 1); Llama 3: vocab-parallel (dim 0)
        return 0 if part.shape[1] == dim else 1
    if name == "output.weight":
        return 0
    return _META_SPLIT_DIM.get(name.split(".")[-2])
