"""Meta checkpoint directories: params.json + consolidated.*.pth shards -> one state dict in our layout."""

from __future__ import annotations

from pathlib import Path

import torch

from model.args import ModelArgs
from model.errors import CheckpointError
from model.gguf_weights import unpermute_rotary

# How Meta's model-parallel layers split a weight across shards (fairscale): column-parallel along
# dim 0, row-parallel along dim 1; norms are replicated. The embedding is found by shape (Llama 2
# splits it along dim 1, Llama 3 along dim 0).
_META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def read_meta(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Args from params.json and the shards merged into one state dict, Q/K rows in rotate_half order."""
    shard_files = sorted(path.glob("consolidated.*.pth"))
    if not shard_files:
        raise CheckpointError(f"{path}: params.json found but no consolidated.*.pth weights")
    shards = [torch_load(f) for f in shard_files]
    try:
        args = ModelArgs.from_params_json(path / "params.json", tie_word_embeddings="output.weight" not in shards[0])
    except (OSError, ValueError, TypeError, AttributeError) as e:  # ValueError covers JSONDecodeError
        raise CheckpointError(f"{path / 'params.json'}: {e}") from e
    state = merge_meta_shards(shards, args.dim, path)
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(f"{path}: missing tensor tok_embeddings.weight")
    if args.vocab_size <= 0:  # Llama 2 writes vocab_size -1
        args.vocab_size = int(state["tok_embeddings.weight"].shape[0])
    for name in list(state):
        if name.endswith("attention.wq.weight"):
            state[name] = unpermute_meta(state[name], args.n_heads)
        elif name.endswith("attention.wk.weight"):
            state[name] = unpermute_meta(state[name], args.n_kv_heads)
    state.pop("rope.freqs", None)  # Llama 2 checkpoints store their rope table; it is recomputed
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


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], dim: int, source: Path) -> dict[str, torch.Tensor]:
    """One state dict from Meta's model-parallel shards (a single shard is returned as it is)."""
    if len(shards) == 1:
        return dict(shards[0])
    names = list(shards[0])
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))
            raise CheckpointError(f"{source}: shard {i} has different tensors from shard 0: {', '.join(diff[:5])}")
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        parts = [shard[name] for shard in shards]
        split = meta_split_dim(name, parts[0], dim)
        merged[name] = parts[0] if split is None else torch.cat(parts, dim=split)
    return merged


def meta_split_dim(name: str, part: torch.Tensor, dim: int) -> int | None:
    """The dim a shard tensor was split along, or None for replicated tensors (norms)."""
    if part.dim() < 2:
        return None
    if name == "tok_embeddings.weight":  # Llama 2: ParallelEmbedding (dim 1); Llama 3: vocab-parallel (dim 0)
        return 0 if part.shape[1] == dim else 1
    if name == "output.weight":
        return 0
    return _META_SPLIT_DIM.get(name.split(".")[-2])
