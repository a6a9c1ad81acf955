"""Batch invariance: one row's numbers never depend on the other rows of its forward.

Why: evaluation users score the same prompt alone and among 31 others and expect the same bits.
CPU GEMM libraries pick their kernel by the number of rows, so a row's rounding changes with the
batch. Measured on a 2-core Xeon, torch 2.13 (bench/fidelity.py prints the spread): MKL's float32
GEMM has separate regimes at 1, 2-13, 16-48 and 64+ rows; oneDNN's bfloat16 GEMM changes above 32
rows; the int4 layers switched to dense weights above `max_rows`; attention's online softmax walks
the keys in blocks whose size followed the longest row of the batch.

The rules, each of which makes one source of variation impossible rather than unlikely:
1. Prefill runs one prompt per forward, in chunks whose boundaries depend on that prompt alone
   (the engine's job). Its shapes are a function of the prompt, so any kernel may serve them. The
   exception is checked, not built in: where `prefill_rows_independent` finds on this machine that a
   prefill row's numbers depend neither on its chunk nor on the chunks beside it, the engine packs
   several prompts' chunks into one forward (`packed_prefill_inputs`) and the prefix cache reuses keys
   inside a chunk. The last column's logits use the decode head (rule 2), whose rows are independent.
2. A decode forward (one token per row) computes each linear layer with a kernel whose rows are
   independent by construction -- the int4 weight-only kernel, where every output row accumulates
   its own dot products over K in a fixed order -- or, for dense weights, in tiles of a fixed
   number of rows: every call is then a GEMM of one shape. Rows of one GEMM never mix, but a BLAS
   may still round a row differently by its position in the tile (MKL's AVX2 kernels do at 8
   rows: 6-row micro-kernels plus a tail). So the tile is chosen per weight shape at load time:
   the smallest of TILE_CANDIDATES whose every position gives the bits of that row alone at
   position 0, checked on this machine; 1 (one GEMV per row, position 0 always) if none does.
3. Attention reads keys up to a multiple of a block: trailing blocks that are fully masked add exact
   zeros, so the length the batch needs changes nothing. Prefill (SDPA) uses KV_BLOCK, the CPU flash
   kernel's key block; decode (plain matmuls, model/decode_attention.py) the smallest block for
   which that was checked true on this machine.
The sampler keeps its part (model/sampling.py): each row's top-k/top-p candidates depend on that
row's own parameters only.

What it costs is in docs/performance.md; `batch_invariant=False` (`--no-batch-invariant`) restores
the batch-dependent fast paths.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

KV_BLOCK = 512  # aten's CPU flash attention reads keys in blocks of min(512, key length)
# Row tiles tried for dense decode GEMMs, cheapest first. Measured on a 2-core Xeon (torch 2.13,
# MKL): 4 passes on the AVX2 and AVX-512 paths, 12 and 24 on every MKL path down to SSE4.2.
TILE_CANDIDATES = (4, 6, 12, 24)
_tiles: dict[tuple[Any, ...], int] = {}  # (shape, dtype, device, bias?) -> tile: one check per shape


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def is_decode(x: torch.Tensor) -> bool:
    """A (B, 1, D) activation: one new token per row, i.e. rows from different requests."""
    return x.dim() == 3 and x.shape[1] == 1


def row_tile(weight: torch.Tensor, bias: torch.Tensor | None = None) -> int:
    """The smallest candidate tile whose rows this machine's GEMM rounds independently of their
    position and neighbours (rule 2); 1 when none does."""
    key = (tuple(weight.shape), weight.dtype, weight.device, bias is None)
    if key not in _tiles:
        _tiles[key] = next((t for t in TILE_CANDIDATES if _rows_independent(weight, bias, t)), 1)
    return _tiles[key]


@torch.inference_mode()
def _rows_independent(weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> bool:
    generator = torch.Generator().manual_seed(tile)
    x = torch.randn(tile, weight.shape[1], generator=generator).to(weight)
    together = F.linear(x, weight, bias)
    for row in range(tile):
        alone = torch.zeros_like(x)
        alone[0] = x[row]
        if not torch.equal(F.linear(alone, weight, bias)[0], together[row]):
            return False
    return True


# Column tiles tried for the output head (below), smallest first. The head may switch between tiles that
# give the same bits (`head_tiles`), so each batch takes the cheapest fitting one. A 576 x 49,152 float32
# head on a 2-core Zen 3 (torch 2.13, MKL), ms for 1 / 8 / 32 rows: 4 columns 5.7 / 11.9 / 51.9; 8
# columns 9.3 / 9.8 / 39.1; 16 columns 16.6 / 16.4 / 33.7; 32 columns 19.7 / 20.6 / 21.8 (a GEMV: 9.3 for
# one row). There 4 and 8 agree bit for bit, as do 16 and 32, but not the two pairs: the smallest wins,
# batch-1 decode being where a token waits longest for the 113 MB table.
HEAD_TILE_CANDIDATES = (4, 8, 16, 32)
_head_tiles: dict[tuple[Any, ...], tuple[int, ...]] = {}


def head_tiles(weight: torch.Tensor) -> tuple[int, ...]:
    """The column tiles `head_logits` may use for this weight, smallest first: the smallest candidate whose
    columns this machine's GEMM computes independently of their position and neighbours, and every other
    such candidate that gives the same bits as it. Empty when none is independent (then the head runs as
    `tiled_linear` in `row_tile` rows)."""
    key = (tuple(weight.shape), weight.dtype, weight.device)
    if key not in _head_tiles:
        probe = torch.randn(4, weight.shape[1], generator=torch.Generator().manual_seed(1)).to(weight)
        family: list[int] = []
        reference = torch.empty(0)
        for tile in HEAD_TILE_CANDIDATES:  # the cheap comparison first: each independence check is `tile` GEMMs
            bits = head_logits(probe, weight, (tile,))
            if (not family or torch.equal(bits, reference)) and _columns_independent(weight, tile):
                if not family:
                    reference = bits
                family.append(tile)
        _head_tiles[key] = tuple(family)
    return _head_tiles[key]


@torch.inference_mode()
def _columns_independent(weight: torch.Tensor, tile: int) -> bool:
    generator = torch.Generator().manual_seed(tile)
    x = torch.randn(tile, weight.shape[1], generator=generator).to(weight)
    together = torch.mm(weight, x.T)
    for column in range(tile):
        alone = torch.zeros_like(x)
        alone[0] = x[column]
        if not torch.equal(torch.mm(weight, alone.T)[:, 0], together[:, column]):
            return False
    return True


def head_logits(x: torch.Tensor, weight: torch.Tensor, tiles: Sequence[int]) -> torch.Tensor:
    """x @ weight.T for decode rows, as (weight @ x.T) in GEMMs of exactly `tile` columns (zeros pad the
    last), `tile` the smallest of `tiles` that holds every row, else the largest.

    Why transposed: a wide head (vocab x dim) read for a few rows is one long, thin GEMM; as weight @
    x.T, MKL streams the weight once per tile at near-GEMV speed, where F.linear slows with every row.
    """
    rows = x.shape[0]
    tile = next((t for t in tiles if t >= rows), tiles[-1])
    padded = round_up(rows, tile)
    if padded != rows:
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
    out = torch.cat([torch.mm(weight, part.T) for part in x.split(tile)], dim=1)
    return out[:, :rows].T.contiguous()


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    """F.linear computed as GEMMs of exactly `tile` rows (zero rows pad the last one)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    padded = round_up(rows, tile)
    if padded != rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    out = torch.cat([F.linear(part, weight, bias) for part in flat.split(tile)])
    return out[:rows].reshape(*x.shape[:-1], weight.shape[0])


class TiledLinear(nn.Module):
    """A dense linear layer whose decode rows run in fixed tiles (rule 2); prefill uses one GEMM."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.tile = row_tile(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_decode(x):
            return tiled_linear(x, self.weight, self.bias, self.tile)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, decode_row_tile={self.tile}"


@runtime_checkable
class DecodeSwitch(Protocol):
    """A layer with its own row-independent decode kernel, told here to keep it (quant.Int4Linear,
    matched structurally: quant imports this module)."""

    batch_invariant: bool


def make_batch_invariant(model: nn.Module) -> int:
    """Swap every plain nn.Linear for a TiledLinear and tell int4 layers to keep their kernel in
    decode; returns how many dense layers were swapped. The model's head and attention follow
    `model.batch_invariant`, set by `Transformer.setup_cache`."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # The protocol check sees only that the attribute exists; its value must be a flag too.
            if isinstance(child, DecodeSwitch) and isinstance(child.batch_invariant, bool):  # quant.Int4Linear
                child.batch_invariant = True
            elif type(child) is nn.Linear:
                setattr(parent, name, TiledLinear(child))
                swapped += 1
    return swapped


def packed_prefill_inputs(
    chunks: Sequence[tuple[Sequence[int], int]], pad_position: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tokens and positions that prefill several prompts' chunks in one forward.

    chunks: (the chunk's token ids, its first position), one row each. Rows are left-padded to the
    longest chunk, pad columns at `pad_position` (the model's scratch position: their keys are never
    read), so that every row's last column is its chunk's last token: the column whose logits the
    forward returns. Why pack at all: a short chunk's forward costs mostly the weights it reads (on a
    2-core Zen 3 a 16-token chunk took 170 ms and a 512-token one 1,040 ms), and a pack reads them once.
    """
    width = max(len(ids) for ids, _ in chunks)
    tokens = torch.zeros(len(chunks), width, dtype=torch.long)
    positions = torch.full((len(chunks), width), pad_position, dtype=torch.long)
    for row, (ids, start) in enumerate(chunks):
        tokens[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        positions[row, width - len(ids) :] = torch.arange(start, start + len(ids))
    return tokens.to(device), positions.to(device)


@torch.inference_mode()
def prefill_rows_independent(model: Any, slot: int = 0, length: int = 80) -> bool:
    """Do prefill rows get the same keys, values and last logits whatever chunks the prompt is cut into
    (each at least 16 tokens: model/llama.py pads those to row blocks), and whatever other prompts' chunks
    share their forward (`packed_prefill_inputs`)? Checked on this machine with random prompts; the prefix
    cache (app/engine/prefix_cache.py) reuses keys across chunkings, and the engine packs prompts into one
    forward, only if so. Writes `slot` of the cache (and a neighbouring one): call it before serving."""
    if length + 1 > model.max_seq_len:
        return False
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.vocab_size, (1, length), generator=generator).to(model.device)
    other = torch.randint(0, model.vocab_size, (length,), generator=generator).tolist()
    other_slot = slot + 1 if slot + 1 < model.max_batch_size else slot - 1

    def held() -> list[torch.Tensor]:
        caches = [layer.attention.cache for layer in model.layers]
        return [c.k[slot, :, :length].clone() for c in caches] + [c.v[slot, :, :length].clone() for c in caches]

    def prefill(cuts: list[int]) -> list[torch.Tensor]:
        start, logits = 0, torch.empty(0)
        slots = torch.tensor([slot], device=model.device)
        for end in cuts:
            positions = torch.arange(start, end, device=model.device)[None]
            logits = model(prompt[:, start:end], positions, slots, kv_len=end)
            start = end
        return [*held(), logits]

    def packed(cuts: list[int], other_cuts: list[int]) -> list[torch.Tensor]:
        """The prompt's chunks each in one forward with a chunk of another prompt in another slot."""
        ids, start, other_start, logits = prompt[0].tolist(), 0, 0, torch.empty(0)
        slots = torch.tensor([slot, other_slot], device=model.device)
        for end, other_end in zip(cuts, other_cuts):
            rows = [(ids[start:end], start), (other[other_start:other_end], other_start)]
            tokens, positions = packed_prefill_inputs(rows, model.scratch_position, model.device)
            logits = model(tokens, positions, slots, kv_len=max(end, other_end))[:1]
            start, other_start = end, other_end
        return [*held(), logits]

    # Every chunking runs before any comparison: under tensor parallelism each rank checks its own
    # keys and values, and the forwards hold collectives, so no rank may stop early (model/tensor_parallel.py).
    whole, *others = [prefill(cuts) for cuts in ([length], [24, length], [48, length], [16, 40, length])]
    if other_slot >= 0:  # packs: the prompt's chunk longer, then shorter, than its neighbour's
        others += [packed([24, length], [40, 56]), packed([48, length], [16, 64])]
    return all(torch.equal(a, b) for other in others for a, b in zip(whole, other))
