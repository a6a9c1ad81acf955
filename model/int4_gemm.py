"""Our int4 x bfloat16 GEMM (model/kernels/int4_gemm.c) as a torch operator, for quant.Int4Linear.

Why: torch's int4 CPU kernel multiplies in float32; ours uses AVX512-BF16's dot-product instruction on the
same 4-bit weights: a step's 120 GEMMs on a 2-core Zen 4 take 27 vs 45 ms at 32 rows, 11 vs 13 at 8 (one
row is bound by reading the weights: the same 5.6 ms), with the rows independent by construction (see the
C file) and closer to float32 (scales and outputs not rounded to bfloat16). It is a
torch operator (`torch.ops.llamaserve.int4_gemm`), not a ctypes call from Python, so the compiled decode
step calls it from inside its graph. Where the CPU lacks AVX512-BF16, there is no compiler, or the load-time
check fails, Int4Linear keeps torch's kernel and the log says why.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from model.native import NativeBuildError, holding_the_gil, kernel_operator, load_kernel, wanted

GROUP_SIZE = 32
BLOCK_COLUMNS = 16
_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int]
_STATUS = {-1: "bad arguments", -2: "out of memory", -3: "built without AVX512-BF16"}


def pack(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's layout of Q4_1 weights (q in 0..15 of shape (N, K); scale and minimum (N, K / 32)):
    columns in blocks of 16, per block and chunk of 8 k 64 bytes, column j's in bytes 4j..4j+3 (the order
    int4_gemm.c's `unpack` reads them in; shape (N / 16, K / 2, 16)); scale and zero = minimum + 8 * scale
    (the kernel multiplies q - 8) as (N / 16, K / 32, 16) float16, a Q4_1 GGUF's own type (decode reads
    0.625 bytes a weight, not 0.75)."""
    rows, cols = q.shape
    if rows % BLOCK_COLUMNS or cols % GROUP_SIZE:
        raise ValueError(f"int4_gemm takes N a multiple of {BLOCK_COLUMNS} and K of {GROUP_SIZE}, not {rows} x {cols}")
    k = q.to(torch.uint8).reshape(rows // BLOCK_COLUMNS, BLOCK_COLUMNS, cols // 8, 8)  # (block, column, chunk, k)
    # Column j's 4 bytes of a chunk; the kernel's lookups read bytes 4j and 4j + 2 for pairs (k, k+1) and
    # (k+2, k+3), bytes 4j + 1 and 4j + 3 for the other two, low nibbles first (int4_gemm.c's `unpack`).
    four = [k[..., low] | (k[..., high] << 4) for low, high in ((0, 2), (4, 6), (1, 3), (5, 7))]
    packed = torch.stack(four, dim=-1).permute(0, 2, 1, 3).reshape(rows // BLOCK_COLUMNS, cols // 2, BLOCK_COLUMNS)

    def by_block(t: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(t.half()).all():
            raise ValueError("scales or zeros beyond float16's range (|x| > 65504): the int4 kernel cannot hold them")
        return t.half().reshape(rows // BLOCK_COLUMNS, BLOCK_COLUMNS, cols // GROUP_SIZE).permute(0, 2, 1).contiguous()

    return packed, by_block(scale), by_block(minimum + 8 * scale)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """`pack`'s q back (N, K) from its packed bytes: the layout spelled out the other way (tests read it)."""
    blocks, half, _ = packed.shape
    four = packed.reshape(blocks, half // 4, BLOCK_COLUMNS, 4).permute(0, 2, 1, 3)  # (block, column, chunk, byte)
    low, high = four & 15, four >> 4
    k = torch.stack(
        [low[..., 0], low[..., 2], high[..., 0], high[..., 2], low[..., 1], low[..., 3], high[..., 1], high[..., 3]], -1
    )
    return k.reshape(blocks * BLOCK_COLUMNS, half * 2)


def gemm_operator() -> tuple[Callable[..., torch.Tensor], str]:
    """(operator, how it is called): int4_gemm(x (M, K) float32, *pack(...)) -> (M, N) float32, defined on
    first use (nothing is registered at import; call through `native_gemm`, which caches it). The operator
    is torch_ops.cpp's where it builds (~5 us less a call than one in Python: model/native.py), else
    torch.ops.llamaserve.int4_gemm in Python. Raises NativeBuildError where the kernel cannot run here."""
    library = load_kernel("int4_gemm")
    if not library.int4_gemm_available():
        raise NativeBuildError("the CPU (or torch's dispatch level) has no AVX512-BF16")
    kernel = holding_the_gil(library).int4_gemm
    kernel.argtypes, kernel.restype = _ARGTYPES, ctypes.c_int

    def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows, cols = x.shape
        out = torch.empty(rows, scale.shape[0] * BLOCK_COLUMNS, dtype=torch.float32)
        args = (x.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr())
        status = kernel(*args, rows, out.shape[1], cols, torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"int4_gemm kernel failed: {_STATUS.get(status, status)}")
        return out

    def shape_only(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], scale.shape[0] * BLOCK_COLUMNS)

    schema = "(Tensor x, Tensor packed, Tensor scale, Tensor zero) -> Tensor"
    operator, caller = kernel_operator("int4_gemm", schema, library.int4_gemm, int4_gemm, shape_only)
    problem = self_check(operator)
    if problem:
        raise NativeBuildError(problem)
    return operator, caller


KERNEL_ENV = "LLAMASERVE_INT4_KERNEL"  # auto | torch


def native_gemm() -> tuple[Callable[..., torch.Tensor] | None, str]:
    """(the operator, what it is) or (None, why not). $LLAMASERVE_INT4_KERNEL=torch keeps torch's kernel
    (to compare the two, or to run torch's path on a CPU that has ours)."""
    if not wanted(KERNEL_ENV):
        return None, f"torch's kernel (${KERNEL_ENV}=torch)"
    return _built()


@functools.cache
def _built() -> tuple[Callable[..., torch.Tensor] | None, str]:
    """Once per process: a failed build or check is not retried (nor its operator defined twice)."""
    try:
        operator, caller = gemm_operator()
        return operator, f"native kernel (AVX512-BF16 dot products; {caller})"
    except NativeBuildError as e:
        return None, f"torch's kernel: no native one here ({e})"


@torch.inference_mode()
def self_check(operator: Callable[..., torch.Tensor]) -> str | None:
    """Why this build must not be used (None: it may): on random Q4_1 weights, a row must be the same bits
    alone and anywhere in a batch that crosses the register tiles (9 rows, 3 blocks of columns), and match
    the kernel's sum in float64 ((q - 8) x scale times bfloat16-rounded activations, the zero times float32
    ones)."""
    generator = torch.Generator().manual_seed(0)
    rows, cols = 48, 96
    q = torch.randint(0, 16, (rows, cols), generator=generator)
    scale = (torch.rand(rows, cols // GROUP_SIZE, generator=generator) * 0.1).half().float()
    zero = (torch.randn(rows, cols // GROUP_SIZE, generator=generator) * 0.1).half().float()  # float16, as packed
    minimum = zero - 8 * scale
    x = torch.randn(9, cols, generator=generator)
    weights = pack(q, scale, minimum)
    together = operator(x, *weights)
    for row in range(x.shape[0]):
        if not torch.equal(operator(x[row : row + 1], *weights)[0], together[row]):
            return f"the int4 kernel gave row {row} other bits in a batch of {x.shape[0]} than alone"

    def spread(t: torch.Tensor) -> torch.Tensor:
        return t.double().repeat_interleave(GROUP_SIZE, dim=1)

    scaled = (q.double() - 8) * spread(scale)
    expected = x.bfloat16().double() @ scaled.T + x.double() @ spread(zero).T
    tolerance = 1e-5 * (x.abs().double() @ (scaled.abs() + spread(zero).abs()).T).max().item()
    error = (together.double() - expected).abs().max().item()
    if error > tolerance:
        return f"the int4 kernel is off the float64 product by {error:.3g} (allowed {tolerance:.3g})"
    return None
