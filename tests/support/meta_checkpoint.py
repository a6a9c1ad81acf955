"""Meta-format checkpoints (params.json + consolidated.*.pth) written from a transformers model, split
into model-parallel shards the way Meta's fairscale layers split them."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def interleave_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate_half rows -> Meta's interleaved pairs (llama.cpp's `LlamaModel.permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_META_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
# fairscale: ColumnParallelLinear splits dim 0, RowParallelLinear dim 1, norms are replicated.
_META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_state_dict(reference) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """HF weights renamed to Meta's names, Q/K rows permuted back to Meta's interleaved layout."""
    config = reference.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in reference.state_dict().items():
        if name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = tensor
        elif name == "model.norm.weight":
            out["norm.weight"] = tensor
        elif name == "lm_head.weight":
            out["output.weight"] = tensor
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            ours = f"layers.{layer}.{_META_NAMES[module]}.{kind}"
            if module == "self_attn.q_proj":
                tensor = interleave_rotary(tensor, config.num_attention_heads)
            elif module == "self_attn.k_proj":
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
