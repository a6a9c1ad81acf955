"""Meta-format checkpoints (params.json + consolidated.*.pth) written from a transformers model, split
into model-parallel shards the way Meta's fairscale layers split them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.hf_weights import hf_to_ours


def interleave_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate_half rows -> Meta's interleaved pairs (llama.cpp's `LlamaModel.permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# fairscale: ColumnParallelLinear splits dim 0, RowParallelLinear dim 1, norms are replicated.
_META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_state_dict(reference) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """HF weights renamed to Meta's names, Q/K rows permuted back to Meta's interleaved layout."""
    config = reference.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in reference.state_dict().items():
        ours = hf_to_ours(name)  # our names are Meta's
        if ours.endswith("attention.wq.weight"):
            tensor = interleave_rotary(tensor, config.num_attention_heads)
        elif ours.endswith("attention.wk.weight"):
            tensor = interleave_rotary(tensor, config.num_key_value_heads)
        out[ours] = tensor
    return out


def split_meta(state: dict[str, torch.Tensor], n_shards: int, embedding_dim: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in state.items():
        kind = name.split(".")[-2]
        dim = embedding_dim if name == "tok_embeddings.weight" else _META_SPLIT.get(kind)
        parts = [tensor] * n_shards if dim is None else tensor.chunk(n_shards, dim=dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def write_meta_checkpoint(reference, directory: Path, n_shards: int, embedding_dim: int) -> Path:  # type: ignore[no-untyped-def]
    """tests/support/oracle.tiny_hf_llama(intermediate=192, scaling_original=8192) as a Meta checkpoint
    of n_shards shards, the embedding split along embedding_dim (1: Llama 2, 0: Llama 3)."""
    # Meta's params.json has no FFN width: 192 is its formula for dim 64 with multiple_of 32.
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": -1 if embedding_dim else 300,
        "multiple_of": 32,
        "ffn_dim_multiplier": None,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(split_meta(meta_state_dict(reference), n_shards, embedding_dim)):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    return directory
