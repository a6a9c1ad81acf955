"""Static KV cache: `max_batch_size` slots x `max_seq_len` positions per layer, allocated once.

A request owns one slot for its lifetime. Reusing a slot never needs clearing: attention only reads
positions up to the query's own position, and every one of those was written by the current owner.
"""

from __future__ import annotations

import math
import mmap

import torch
from torch import nn


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """torch.zeros, but on the CPU from an anonymous memory map, whose pages the OS hands out already
    zeroed when they are first touched. torch.zeros writes every byte up front: SmolLM2's cache for 32
    slots x 2,048 positions is 3 GB, which took 2.2 s of every start-up and was resident before the
    first request; now memory grows with the positions requests reach. (Zeros matter: attention
    multiplies masked positions' values by a weight of 0, which garbage such as NaN would survive.)"""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device or "cpu").type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)  # the tensor keeps the map alive


class KVCache(nn.Module):
    # Buffers, registered in __init__: declared so that they read as tensors, not `Tensor | Module`.
    k: torch.Tensor
    v: torch.Tensor

    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", zeros_on_demand(shape, dtype, device), persistent=False)
        self.register_buffer("v", zeros_on_demand(shape, dtype, device), persistent=False)

    def window(self, first: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys and values of slots [first, first + rows): what `update` reads in place."""
        return self.k[first : first + rows], self.v[first : first + rows]

    def update(
        self,
        slots: torch.Tensor | None,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_len: int,
        window: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([B, H, T, D]) at (slot, position); return each row's first kv_len keys/values.

        `slots=None` means row i uses slot i, or slot first + i of a `window(first, B)`: the read is then
        a view of the cache, not a gather copy.
        """
        batch = positions.shape[0]
        keys, values = (self.k, self.v) if window is None or slots is not None else window
        rows = (torch.arange(batch, device=positions.device) if slots is None else slots)[:, None]
        keys[rows, :, positions] = k.transpose(1, 2)
        values[rows, :, positions] = v.transpose(1, 2)
        if slots is None:
            return keys[:batch, :, :kv_len], values[:batch, :, :kv_len]
        return read_slots(self.k, slots, kv_len), read_slots(self.v, slots, kv_len)

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Positions [0, length) of slot `source` into slot `target` (the prefix cache shares a prompt)."""
        self.k[target, :, :length] = self.k[source, :, :length]
        self.v[target, :, :length] = self.v[source, :, :length]


def first_of_run(slots: torch.Tensor) -> int | None:
    """s when `slots` are s, s + 1, ..., s + B - 1 (read as a window, in place), else None (gathered).
    Only for slots in host memory: reading device values would cost a sync every step."""
    if slots.device.type != "cpu" or slots.dim() != 1 or slots.numel() == 0:
        return None
    first = int(slots[0])
    return first if slots.tolist() == list(range(first, first + slots.numel())) else None


@torch.library.custom_op("llamaserve::read_slots", mutates_args=())
def read_slots(cache: torch.Tensor, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
    """cache[slots, :, :kv_len], a copy.

    index_select on dim 0 copies whole (head, position) runs: ~3x faster than advanced indexing's
    element-wise gather (0.56 vs 1.5 ms for 32 slots x 512 keys on a 2-core Xeon). An op of its own
    so that torch.compile calls it as it is: Inductor turned the gather into a C++ loop of its own
    that was slower still (5.7 ms a layer at 32 rows, model/static_step.py).
    """
    return torch.index_select(cache[:, :, :kv_len], 0, slots)


@read_slots.register_fake
def _read_slots_shape(cache: torch.Tensor, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
    return cache.new_empty(slots.shape[0], cache.shape[1], kv_len, cache.shape[3])
