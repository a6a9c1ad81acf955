"""Int4 weight-only linear layers for CPU decode: 8x fewer weight bytes per token than float32.

Why: on a CPU, decoding a few rows is bound by reading the weights from memory (SmolLM2 in float32
reads ~540 MB a token). Group-wise 4-bit weights -- groups of 32 along the input, one scale and one
minimum per group, the Q4_1 layout llama.cpp ships the default model in -- are read by torch's own
int4 kernel (`aten._weight_int4pack_mm_for_cpu`, the kernel torchao uses). That kernel is fast only
with bfloat16 activations and bfloat16 scales, so those two are rounded to bfloat16; it accumulates
in float32.

The kernel loses to dense GEMM once many rows share each weight read (prefill chunks, large decode
batches), so every layer keeps its dense weight and uses it above `max_rows` rows. Re-quantising a
Q4_1 GGUF's dequantised weights finds the file's own grid again (each group's minimum and maximum
are on it), so `auto` quantises exactly those files and never loses precision the checkpoint had.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZE = 32
Quantization = Literal["auto", "none", "int4"]
QUANTIZATIONS: tuple[str, ...] = ("auto", "none", "int4")
GGUF_FILE_TYPE_Q4_1 = 3  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_1 (`general.file_type`)

# Rows up to which the int4 kernel beats dense float32 GEMM, from bench/int4_crossover.py on a
# 2-core Xeon (torch 2.13): about 32 with the AVX-512 kernels, about 12 with AVX2.
MAX_ROWS_BY_CAPABILITY = {"AVX512": 32, "AVX2": 12}


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to: AVX512, AVX2, or DEFAULT (scalar)."""
    return torch.backends.cpu.get_cpu_capability()


def default_max_rows() -> int:
    """Rows per call below which int4 pays on this CPU; 0 where torch has no vector int4 kernel."""
    return MAX_ROWS_BY_CAPABILITY.get(cpu_capability(), 0)


def resolve_quantization(requested: str, device: str | torch.device, gguf_file_type: Any = None) -> str:
    """`auto` -> int4 for a Q4_1 GGUF on a CPU with a vector int4 kernel, else none.

    ValueError for int4 where it cannot run or cannot pay: on an accelerator (not built), or on a
    CPU without AVX2 (the scalar kernel is slower than dense float32).
    """
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {requested!r}")
    on_cpu = torch.device(device).type == "cpu"
    if requested == "auto":
        is_q4_1 = gguf_file_type is not None and int(gguf_file_type) == GGUF_FILE_TYPE_Q4_1
        return "int4" if on_cpu and is_q4_1 and default_max_rows() > 0 else "none"
    if requested == "int4" and not on_cpu:
        raise ValueError(f"quantization int4 runs on CPU only, not on {device}")
    if requested == "int4" and default_max_rows() == 0:
        raise ValueError(f"quantization int4 needs a CPU with AVX2 or AVX-512 (torch reports {cpu_capability()})")
    return requested


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 in 0..15, scale, minimum), as llama.cpp's Q4_1: w ~= q * scale + minimum per group.

    weight (N, K) with K a multiple of GROUP_SIZE; scale and minimum are (N, K / GROUP_SIZE).
    """
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    minimum = groups.amin(dim=-1)
    scale = (groups.amax(dim=-1) - minimum) / 15
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = ((groups - minimum[..., None]) * inverse[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.reshape(rows, cols), scale, minimum


class Int4Linear(nn.Module):
    """A bias-optional linear layer that reads 4-bit weights for small batches, dense ones otherwise."""

    def __init__(self, linear: nn.Linear, max_rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.max_rows = max_rows
        q, scale, minimum = quantize_groups(linear.weight.detach())
        # The kernel dequantises (q - 8) * scale + zero, so zero is the group's value at q = 8.
        scales_and_zeros = torch.stack([scale, minimum + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP_SIZE, self.scales_and_zeros)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP_SIZE}, max_rows={self.max_rows}"


def fits_kernel(linear: nn.Linear) -> bool:
    """The kernel packs output rows in 16s and reads the input in groups."""
    return linear.in_features % GROUP_SIZE == 0 and linear.out_features % 16 == 0


def quantize_int4(model: nn.Module, max_rows: int | None = None) -> int:
    """Swap every nn.Linear the kernel can take (input width a multiple of 32, output of 16) for an
    Int4Linear; returns how many.

    The output head stays dense: the tied head is the embedding table, and its logits decide every
    sampled token.
    """
    max_rows = default_max_rows() if max_rows is None else max_rows
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "output" and fits_kernel(child):
                setattr(parent, name, Int4Linear(child, max_rows))
                swapped += 1
    return swapped
