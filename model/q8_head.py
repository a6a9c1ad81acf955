"""The decode head in int8 with one float32 scale per 32 weights (llama.cpp's Q8_0 grid).

Why: on a CPU a decode step of a small model is bound by reading weights, and the output head is the
widest matrix there is (SmolLM2's tied 49,152 x 576 head is 113 MB in float32, more than all its int4
layers). GGUF files store it as Q8_0, so the float32 head the loader builds holds only int8 multiples of
a per-group scale: the same values fit in 28 MB of int8 and 3.5 MB of scales, with no loss at all.
torch has no CPU GEMM for group-quantised int8, so model/kernels/q8_head.c computes it: ~2x faster than
the float32 head for one row and for 32 (docs/performance.md).

Logits differ from the float32 head's only by the order of float32 additions, and each row's logits are
the same bits whatever else is in the batch: the kernel's sums have one fixed order, and `build_q8_head`
checks that on this machine's build before the model uses it.
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F

from model.native import NativeBuildError, load_kernel

log = logging.getLogger(__name__)

GROUP_SIZE = 32
_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (V, K), scale float32 (V, K / 32)) with weight ~= q * scale per group of 32 along K, as
    llama.cpp's Q8_0: each group's largest magnitude maps to +-127. Exact for weights on that grid."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    scale = groups.abs().amax(dim=-1) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = (groups * inverse[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.reshape(rows, cols), scale


def dequantize_q8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weights `quantize_q8`'s output stands for."""
    rows, cols = q.shape
    return (q.reshape(rows, -1, GROUP_SIZE).float() * scale[..., None]).reshape(rows, cols)


class Q8Head:
    """logits = x @ dequantize_q8(q, scale).T for (B, K) float32 rows, through the C kernel.

    The kernel runs the vocabulary across its vector lanes: the weights are packed once here in blocks
    of `lanes` entries, k-major, the vocabulary padded with zero rows to a multiple of two blocks."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, library: ctypes.CDLL, *, exact: bool) -> None:
        self.vocab_size, self.dim = q.shape
        self.exact = exact  # whether the float32 weights were on the grid (else rounded to it)
        library.q8_head_lanes.restype = ctypes.c_int
        self.lanes = library.q8_head_lanes()
        self.padded_vocab = -(-self.vocab_size // (2 * self.lanes)) * 2 * self.lanes
        pad = self.padded_vocab - self.vocab_size
        q, scale = F.pad(q, (0, 0, 0, pad)), F.pad(scale.float(), (0, 0, 0, pad))  # zero rows: zero logits, dropped
        blocks = self.padded_vocab // self.lanes
        self.packed = q.reshape(blocks, self.lanes, self.dim).transpose(1, 2).contiguous()  # (block, k, lane)
        self.scales = scale.reshape(blocks, self.lanes, -1).transpose(1, 2).contiguous()  # (block, group, lane)
        self._kernel = library.q8_head
        self._kernel.argtypes = _ARGTYPES
        self._kernel.restype = ctypes.c_int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"the head takes (rows, {self.dim}) inputs, not {list(x.shape)}")
        x = x.float().contiguous()
        out = torch.empty(x.shape[0], self.padded_vocab)
        threads = torch.get_num_threads()
        status = self._kernel(
            self.packed.data_ptr(),
            self.scales.data_ptr(),
            x.data_ptr(),
            out.data_ptr(),
            self.padded_vocab,
            self.dim,
            x.shape[0],
            threads,
        )
        if status != 0:
            raise RuntimeError(f"q8_head kernel failed with status {status}")
        return out if self.padded_vocab == self.vocab_size else out[:, : self.vocab_size].contiguous()

    def __repr__(self) -> str:
        return f"Q8Head(vocab={self.vocab_size}, dim={self.dim}, group={GROUP_SIZE}, lanes={self.lanes}, exact={self.exact})"


def build_q8_head(weight: torch.Tensor, *, exact_only: bool) -> tuple[Q8Head | None, str]:
    """(the head, what it is) or (None, why not). exact_only: only weights already on the Q8_0 grid (what
    `--quantization auto` asks: no logit may move by more than summation order); otherwise the head is
    rounded to that grid (`--quantization int4`, which rounds the layers too)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None, f"the head is {weight.dtype} on {weight.device.type}, the kernel takes float32 on the CPU"
    if weight.dim() != 2 or weight.shape[1] % GROUP_SIZE:
        return None, f"head width {weight.shape[-1]} is not a multiple of {GROUP_SIZE}"
    q, scale = quantize_q8(weight)
    exact = bool(torch.equal(dequantize_q8(q, scale), weight))
    if exact_only and not exact:
        return None, "the head's weights are not on a Q8_0 grid (kept in float32, exact)"
    try:
        head = Q8Head(q, scale, load_kernel("q8_head"), exact=exact)
    except NativeBuildError as e:
        return None, f"no native kernel: {e}"
    problem = self_check(head, weight if exact else dequantize_q8(q, scale))
    if problem:
        return None, problem
    grid = "the file's own Q8_0 grid, exact" if exact else "rounded to a Q8_0 grid"
    return head, f"int8 in groups of {GROUP_SIZE} ({grid}), native kernel"


@torch.inference_mode()
def self_check(head: Q8Head, reference: torch.Tensor) -> str | None:
    """Why this build must not be used (None: it may): a row's logits must be the same bits alone and at
    each position of a batch that crosses the kernel's register tiles, and close to the float32 GEMM's."""
    x = torch.randn(9, head.dim, generator=torch.Generator().manual_seed(0))
    together = head(x)
    for row in range(x.shape[0]):
        if not torch.equal(head(x[row : row + 1])[0], together[row]):
            return f"the native head gave row {row} other bits in a batch of {x.shape[0]} than alone"
    expected = x @ reference.T
    tolerance = 1e-4 * (x.abs() @ reference.abs().T).max().item() + 1e-6
    error = (together - expected).abs().max().item()
    if error > tolerance:
        return f"the native head is off the float32 GEMM by {error:.3g} (allowed {tolerance:.3g})"
    return None
