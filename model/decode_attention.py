"""Attention of one new token per row over its slot's cached keys, and the key block it reads them in.

Its own module because batch invariance (model/invariance.py, rule 3) hangs on it: every row's
reductions run in one order whatever the batch, and the key length a step reads is a multiple of a block
checked on this machine to change no bit.
"""

from __future__ import annotations

import math

import torch

from model.invariance import KV_BLOCK


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
