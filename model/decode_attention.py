"""Attention of one new token per row over its slot's cached keys, and the key block it reads them in.

Its own module because batch invariance (model/invariance.py, rule 3) hangs on it: every row's
reductions run in one order whatever the batch, and the key length a step reads is a multiple of a block
checked on this machine to change no bit.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from model.invariance import KV_BLOCK
from model.native import NativeBuildError, holding_the_gil, kernel_operator, load_kernel, wanted


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row (q: B, H, 1, D; keys/values: B, KVH, L, D; mask: B, 1, 1, L), in plain ops.

    Why not SDPA: with 2 threads, aten's CPU flash kernel splits a small batch's keys across threads,
    so a row's bits depended on how many rows shared its step (Zen 4, torch 2.13: alone vs with one
    other row differed by 2e-8). Here the query heads that share a key head form the rows of one
    (G x D) @ (D x L) product per (row, key head): no GQA copy of the keys, each row's reductions in
    one order whatever the batch, and faster than SDPA for decode (batch 32, 2,048 keys: 4.2 vs 6.0 ms).
    """
    batch, heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(weights, values).reshape(batch, heads, 1, head_dim)


# Key lengths decode attention may read in multiples of, smallest first (rule 3 of model/invariance.py).
# Why not KV_BLOCK: decode attention is plain matmuls, not the flash kernel whose 512-key block set that;
# a step at 200 keys read 512 of them, and attention was a quarter of a 32-row step (2-core Zen 3).
DECODE_KEY_BLOCKS = (64, 128, 256)
_decode_key_blocks: dict[tuple[object, ...], int] = {}


def decode_key_block(n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str) -> int:
    """The multiple of keys a batch-invariant decode step reads: the smallest of DECODE_KEY_BLOCKS for which
    a row's attention is the same bits whatever number of masked keys follow its own (1 to 8 blocks of
    them, random data, checked on this machine), else KV_BLOCK, the length every earlier step read."""
    key = (n_heads, n_kv_heads, head_dim, dtype, str(device))
    if key not in _decode_key_blocks:
        fits = (b for b in DECODE_KEY_BLOCKS if _masked_keys_change_nothing(b, n_heads, n_kv_heads, head_dim, dtype, device))
        _decode_key_blocks[key] = next(fits, KV_BLOCK)
    return _decode_key_blocks[key]


@torch.inference_mode()
def _masked_keys_change_nothing(
    block: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
) -> bool:
    generator = torch.Generator().manual_seed(block)
    longest = 8 * block
    q = torch.randn(2, n_heads, 1, head_dim, generator=generator).to(device, dtype)
    keys, values = (torch.randn(2, n_kv_heads, longest, head_dim, generator=generator).to(device, dtype) for _ in range(2))
    lengths = torch.tensor([block - 3, block // 2 + 1], device=device)  # each row's own keys
    outputs = []
    for blocks in (1, 2, 3, 8):
        length = blocks * block
        mask = (torch.arange(length, device=device)[None] < lengths[:, None])[:, None, None]
        outputs.append(decode_attention(q, keys[:, :, :length], values[:, :, :length], mask))
    return all(torch.equal(out, outputs[0]) for out in outputs[1:])


# -- our kernel (model/kernels/decode_attention.c) -----------------------------------------------------
# q, its row and head strides; keys, values, their row, head and position strides; positions, out; B, H, KVH, L, D; threads
_POINTER, _LONG = ctypes.c_void_p, ctypes.c_long
_ARGTYPES: list[Any] = [_POINTER, _LONG, _LONG, _POINTER, _POINTER, _LONG, _LONG, _LONG, _POINTER, _POINTER]
_ARGTYPES += [_LONG] * 5 + [ctypes.c_int]
KERNEL_ENV = "LLAMASERVE_ATTENTION_KERNEL"  # auto | torch


def _attention_operator() -> tuple[Callable[..., torch.Tensor], str]:
    """(operator, how it is called): decode_attention(q (B, H, 1, D), keys, values (B, KVH, L, D), positions
    (B, 1)) -> (B, H, 1, D): `decode_attention` for float32 on the CPU, each row over its own position + 1
    keys (a row at position >= L pads a bucket: it reads one key). torch_ops.cpp's operator where it builds,
    else one in Python (model/native.py). Raises NativeBuildError where the kernel cannot run here."""
    library = load_kernel("decode_attention")
    if not library.decode_attention_available():
        raise NativeBuildError("the CPU (or torch's dispatch level) has no AVX-512")
    kernel = holding_the_gil(library).decode_attention
    kernel.argtypes, kernel.restype = _ARGTYPES, ctypes.c_int

    def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch, heads, _, head_dim = q.shape
        q, keys, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, keys, values))
        if keys.stride() != values.stride():
            keys, values = keys.contiguous(), values.contiguous()
        positions = positions.reshape(batch).to(torch.int64).contiguous()
        out = torch.empty(batch, heads, 1, head_dim, dtype=torch.float32)
        status = kernel(
            q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(), *keys.stride()[:3],
            positions.data_ptr(), out.data_ptr(), batch, heads, keys.shape[1], keys.shape[2], head_dim,
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"decode_attention kernel failed with status {status}")
        return out

    def shape_only(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return q.new_empty(q.shape)

    schema = "(Tensor q, Tensor keys, Tensor values, Tensor positions) -> Tensor"
    operator, caller = kernel_operator("decode_attention", schema, library.decode_attention, attend, shape_only)
    problem = self_check(operator)
    if problem:
        raise NativeBuildError(problem)
    return operator, caller


def native_decode_attention(
    n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[Callable[..., torch.Tensor] | None, str]:
    """(the operator, what it is) or (None, why the plain ops stay). $LLAMASERVE_ATTENTION_KERNEL=torch
    keeps the plain ops (to compare, or to run their path on a CPU that has the kernel)."""
    if not wanted(KERNEL_ENV):
        return None, f"plain ops (${KERNEL_ENV}=torch)"
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return None, f"plain ops: the kernel takes float32 on the CPU, not {dtype} on {torch.device(device).type}"
    if head_dim % 16 or head_dim > 256 or n_heads % n_kv_heads or n_heads // n_kv_heads > 16:
        return None, "plain ops: the kernel takes head_dim a multiple of 16 up to 256 and <= 16 query heads a key head"
    return _built()


@functools.cache
def _built() -> tuple[Callable[..., torch.Tensor] | None, str]:
    """Once per process: a failed build or check is not retried (nor its operator defined twice)."""
    try:
        operator, caller = _attention_operator()
        return operator, f"native kernel ({caller})"
    except NativeBuildError as e:
        return None, f"plain ops: no native kernel here ({e})"


@torch.inference_mode()
def self_check(operator: Callable[..., torch.Tensor]) -> str | None:
    """Why this build must not be used (None: it may): a row's output must be the same bits alone and in a
    batch, whatever key length the step reads beyond its own keys, and close to the plain ops' output."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, head_dim, length = 5, 6, 2, 32, 80
    q = torch.randn(batch, heads, 1, head_dim, generator=generator)
    keys, values = (torch.randn(batch, kv_heads, length, head_dim, generator=generator) for _ in range(2))
    positions = torch.tensor([[0], [16], [17], [40], [79]])
    together = operator(q, keys, values, positions)
    for row in range(batch):
        own = int(positions[row]) + 1
        alone = operator(q[row : row + 1], keys[row : row + 1, :, :own], values[row : row + 1, :, :own], positions[row : row + 1])
        if not torch.equal(alone, together[row : row + 1]):
            return f"the attention kernel gave row {row} other bits in a batch of {batch} (or over more keys) than alone"
    mask = (torch.arange(length)[None] <= positions)[:, None, None]
    expected = decode_attention(q, keys, values, mask)
    error = (together - expected).abs().max().item()
    if error > 1e-5:
        return f"the attention kernel is off the plain ops by {error:.3g} (allowed 1e-5)"
    return None
