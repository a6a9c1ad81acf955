"""Rotary position embeddings: the frequencies (with Llama 3.1's long-context scaling), the cos/sin tables a
model builds once, and their application in the rotate_half layout (HF's; model/gguf_weights.py un-permutes
GGUF's interleaved Q/K rows to it)."""

from __future__ import annotations

import math

import torch

from model.args import ModelArgs, RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3.1's long-context scaling when given."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return freqs.float()
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = torch.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    return torch.where(middle, blended, scaled).float()


def rope_tables(args: ModelArgs, max_seq_len: int, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_seq_len, head_dim), in the rotate_half layout, in fp32."""
    freqs = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D) fp32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)
