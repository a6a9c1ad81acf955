"""Int4 weight-only linear layers for CPU decode: 8x fewer weight bytes per token than float32.

Why: on a CPU, decoding a few rows is bound by reading the weights from memory (SmolLM2 in float32
reads ~540 MB a token). Group-wise 4-bit weights -- groups of 32 along the input, one scale and one
minimum per group, the Q4_1 layout llama.cpp ships the default model in -- are read by torch's own
int4 kernel (`aten._weight_int4pack_mm_for_cpu`, the kernel torchao uses). That kernel is fast only
with bfloat16 activations, scales and zeros; it accumulates in float32 and returns bfloat16. Where the
CPU has AVX512-BF16, our own kernel (model/int4_gemm.py) takes its place: the same 4-bit weights with
float16 scales and zeros applied in float32, bfloat16 dot products, float32 output; 1.6x faster at 32 rows.

The kernel loses to dense GEMM once many rows share each weight read (prefill chunks, large decode
batches), so every layer keeps a dense weight and uses it above `max_rows` rows: in bfloat16 on CPUs
with bf16 matmul units (AMX, AVX512-BF16), where that GEMM is ~2x faster than float32, else in the
model's dtype. Re-quantising a Q4_1 GGUF's dequantised weights finds the file's own grid again (each
group's minimum and maximum are on it), so `auto` quantises exactly those files, and keeps dense any
layer that is not on the grid.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model import int4_gemm
from model.invariance import is_decode

GROUP_SIZE = 32
QUANTIZATIONS: tuple[str, ...] = ("auto", "none", "int4")
GGUF_FILE_TYPE_Q4_1 = 3  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_1 (`general.file_type`)

# Rows up to which the int4 kernel beats the dense weights, from bench/int4_crossover.py on a
# 2-core Xeon (torch 2.13): vs float32 GEMM about 32 with the AVX-512 kernels and 12 with AVX2; vs
# bfloat16 GEMM (AMX) about 12.
MAX_ROWS_VS_FLOAT32 = {"AVX512": 32, "AVX2": 12}
MAX_ROWS_VS_BFLOAT16 = 12
# Below model.llama.PREFILL_PAD_FROM (16) on purpose: prefill chunks of 16+ rows then all run dense, so a
# prompt's keys do not depend on how it was chunked and the prefix cache may reuse them inside a chunk
# (model/invariance.prefill_rows_independent). Our int4 kernel beats dense bf16 up to 64 rows on Zen 4
# (bench/int4_crossover.py), but 64 here stopped that reuse.


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to: AVX512, AVX2, or DEFAULT (scalar)."""
    return torch.backends.cpu.get_cpu_capability()


def native_bf16_matmul() -> bool:
    """AVX512-BF16 or AMX: bfloat16 GEMM beats float32 here (elsewhere it is emulated, ~70x slower).

    torch's probes are private, so a torch without them counts as no.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


DENSE_BF16_ENV = "LLAMASERVE_DENSE_BF16"  # auto | on | off


def dense_bf16() -> bool:
    """Whether the int4 layers keep their dense (prefill) weights in bfloat16.

    auto follows the hardware (`native_bf16_matmul`); $LLAMASERVE_DENSE_BF16=on/off overrides it, so
    one machine can run the other dispatch path (CI runs the model tests both ways; with
    ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2 beside `off`
    an AMX Xeon computes like an AVX2-only CPU).
    """
    choice = os.environ.get(DENSE_BF16_ENV, "auto").strip().lower()
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"${DENSE_BF16_ENV} must be auto, on or off, got {choice!r}")
    return native_bf16_matmul() if choice == "auto" else choice == "on"


def int4_kernel_available() -> bool:
    """torch (>= 2.6) has vectorised int4 kernels for AVX2 and AVX-512; the scalar one is slower than float32."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and cpu_capability() in MAX_ROWS_VS_FLOAT32


def default_layout() -> tuple[int, torch.dtype | None]:
    """(max_rows, dtype of the dense weights) for this CPU: on bf16 hardware the dense weights used
    above max_rows (prefill, large batches) are bfloat16, about 2x faster than float32 there;
    None keeps the model's dtype."""
    if dense_bf16():
        return MAX_ROWS_VS_BFLOAT16, torch.bfloat16
    return MAX_ROWS_VS_FLOAT32.get(cpu_capability(), 0), None


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
        return "int4" if on_cpu and is_q4_1 and int4_kernel_available() else "none"
    if requested == "int4" and not on_cpu:
        raise ValueError(f"quantization int4 runs on CPU only, not on {device}")
    if requested == "int4" and not int4_kernel_available():
        raise ValueError(
            f"quantization int4 needs torch >= 2.6 and a CPU with AVX2 or AVX-512 "
            f"(torch {torch.__version__} reports {cpu_capability()})"
        )
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


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The float32 weights `quantize_groups`' output stands for: q * scale + minimum per group."""
    rows, cols = q.shape
    return (q.reshape(rows, -1, GROUP_SIZE) * scale[..., None] + minimum[..., None]).reshape(rows, cols)


class Int4Linear(nn.Module):
    """A bias-optional linear layer that reads 4-bit weights for small batches, dense ones otherwise.

    dense_dtype: the dtype the dense weights are kept in (None: as given); the input is cast to it
    and the output back, the bias is added in the input's dtype. Built once from a loaded layer:
    the packed weights are derived, so loading a state dict into it or casting it afterwards
    would leave them stale (nothing does either; build a new one instead). native: use our kernel where
    this machine can run it (`int4_gemm.native_gemm`), else torch's; `kernel` says which.
    """

    def __init__(self, linear: nn.Linear, max_rows: int, dense_dtype: torch.dtype | None = None, *, native: bool = True) -> None:
        super().__init__()
        weight = linear.weight.detach()
        if weight.device.type != "cpu":
            raise ValueError(f"Int4Linear runs on CPU only, not on {weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(weight.to(dense_dtype or weight.dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.max_rows = max_rows
        # With batch invariance, decode rows always take the kernel (its rows are independent by
        # construction); only prefill, whose shapes depend on one prompt, may go dense.
        self.batch_invariant = False
        q, scale, minimum = quantize_groups(weight)
        # Whether the 4-bit grid holds the weights exactly (true for a Q4_1 file's own layers); None
        # when they were rounded to a 16-bit dtype on loading, which moves them off any grid.
        self.on_grid: bool | None = None
        if weight.dtype == torch.float32:
            self.on_grid = bool(torch.equal(dequantize_groups(q, scale, minimum), weight))
        self.gemm, self.kernel = int4_gemm.native_gemm() if native else (None, "torch's kernel")
        if self.gemm is not None:
            try:
                buffers = dict(zip(("packed", "scales", "zeros"), int4_gemm.pack(q, scale, minimum)))
            except ValueError as e:
                self.gemm, self.kernel = None, f"torch's kernel ({e})"
        if self.gemm is None:
            # torch's kernel dequantises (q - 8) * scale + zero, so zero is the group's value at q = 8.
            scales_and_zeros = torch.stack([scale, minimum + 8 * scale], dim=-1).transpose(0, 1).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            buffers = {"packed": packed, "scales_and_zeros": scales_and_zeros.to(torch.bfloat16)}
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        # Decode first: a decode step's row count is a dynamic dimension of the compiled step
        # (model/static_step.py), and comparing it with max_rows would split that graph in two.
        if not (self.batch_invariant and is_decode(x)) and rows > self.max_rows:
            out = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        elif self.gemm is not None:
            flat = x.reshape(rows, self.in_features).float()
            out = self.gemm(flat, self.packed, self.scales, self.zeros).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP_SIZE, self.scales_and_zeros)
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP_SIZE}, "
            f"max_rows={self.max_rows}, dense={self.weight.dtype}, batch_invariant={self.batch_invariant}, "
            f"kernel={'native' if self.gemm is not None else 'torch'}"
        )


def fits_kernel(linear: nn.Linear) -> bool:
    """The kernel packs output rows in 16s and reads the input in groups."""
    return linear.in_features % GROUP_SIZE == 0 and linear.out_features % 16 == 0


def quantize_int4(
    model: nn.Module, max_rows: int | None = None, dense_dtype: torch.dtype | None = None, *, exact_only: bool = False
) -> tuple[int, int]:
    """Swap every nn.Linear the kernel can take (input width a multiple of 32, output of 16) for an
    Int4Linear; returns (swapped, kept dense because not exact).

    exact_only: swap only layers whose float32 weights lie on the 4-bit grid already (what `auto`
    asks, so a file labelled Q4_1 with some layers in other formats loses nothing in those; 16-bit
    weights cannot be checked and are swapped). The output head
    stays dense: the tied head is the embedding table, and its logits decide every sampled token.
    """
    if max_rows is None:
        max_rows, dense_dtype = default_layout()
    swapped = inexact = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not (isinstance(child, nn.Linear) and name != "output" and fits_kernel(child)):
                continue
            layer = Int4Linear(child, max_rows, dense_dtype)
            if exact_only and layer.on_grid is False:
                inexact += 1
                continue
            setattr(parent, name, layer)
            swapped += 1
    return swapped, inexact
