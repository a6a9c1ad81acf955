"""The Llama network in plain PyTorch, in the spirit of Meta's llama3 `model.py`.

Differences from Meta's file, each for a reason:
- RoPE uses the HF `rotate_half` layout; loaders convert Meta and GGUF Q/K weights to it once.
- The KV cache is a set of slots: every row of a batch says which slot it writes and at which
  positions, so decode rows at different lengths and a prefill into one slot share one forward.
- Optional qkv bias (Qwen2) and tied output head (SmolLM2, small Qwen2).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.decode_attention import decode_attention, decode_key_block, native_decode_attention
from model.invariance import KV_BLOCK, head_logits, head_tiles, round_up, row_tile, tiled_linear
from model.kv_cache import KVCache, first_of_run
from model.q8_head import Q8Head
from model.rope import apply_rope, rope_tables

# Prefill chunks of PREFILL_PAD_FROM tokens or more run padded to a multiple of PREFILL_ROW_BLOCK rows, so
# the dense GEMMs see at most chunk / PREFILL_ROW_BLOCK shapes. Why: oneDNN's bfloat16 matmul keeps memory
# for every distinct row count it has seen, beyond its primitive cache (random prompt lengths grew the
# resident memory ~1 MiB per new length, without end; issue 12). Shorter chunks stay exact-sized: they
# run on the int4 kernel, whose memory does not grow, and padding them would switch them to dense.
PREFILL_PAD_FROM = 16
PREFILL_ROW_BLOCK = 32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32: the mean of squares overflows/underflows in half precision.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def concat_linears(*linears: nn.Linear) -> nn.Linear:
    """One linear layer whose outputs are those of `linears`, in order (same input, weights stacked by rows).

    Each output is the same dot product as before, so int4 grids and row tiles are those of the parts.
    """
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        biases = [linear.bias.detach() for linear in linears if linear.bias is not None]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.wqkv: nn.Module | None = None  # wq, wk, wv in one layer once `fuse` ran
        self.qkv_sizes = [args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.n_kv_heads * args.head_dim]
        self.cache: KVCache | None = None
        self.native_decode: Callable[..., torch.Tensor] | None = None  # our decode kernel, set by setup_cache

    def fuse(self) -> None:
        """Read x once for q, k and v: one (larger) GEMM instead of three, a third of the kernel calls."""
        if self.wqkv is not None:
            return
        self.wqkv = concat_linears(self.wq, self.wk, self.wv)
        del self.wq, self.wk, self.wv

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.wqkv is None:  # as loaded, before `fuse`
            return self.wq(x), self.wk(x), self.wv(x)
        q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor | None,
        positions: torch.Tensor,
        mask: torch.Tensor,
        keys_window: torch.Tensor | None = None,
        values_window: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = self.project(x)
        q = q.reshape(batch, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        assert self.cache is not None, "call Transformer.setup_cache() before forward()"
        window = None if keys_window is None or values_window is None else (keys_window, values_window)
        keys, values = self.cache.update(slots, positions, k, v, mask.shape[-1], window)
        if seqlen == 1 and self.native_decode is not None:
            out = self.native_decode(q, keys, values, positions)
        elif seqlen == 1:
            out = decode_attention(q, keys, values, mask)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # w1 and w3 in one layer once `fuse` ran
        self.hidden_dim = hidden_dim

    def fuse(self) -> None:
        """Read x once for the gate and the up projection: one GEMM instead of two."""
        if self.w13 is not None:
            return
        self.w13 = concat_linears(self.w1, self.w3)
        del self.w1, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:  # as loaded, before `fuse`
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor | None,
        positions: torch.Tensor,
        mask: torch.Tensor,
        keys_window: torch.Tensor | None = None,
        values_window: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """keys_window/values_window: the cache slots the rows use in place (KVCache.window), with slots=None."""
        h = x + self.attention(self.attention_norm(x), cos, sin, slots, positions, mask, keys_window, values_window)
        return h + self.feed_forward(self.ffn_norm(h))


# Runs a step's layers: (layers, h, cos, sin, slots, positions, mask, keys_windows, values_windows) -> h,
# a window per layer (None where the keys are gathered by slot). StaticStep passes its compiled one.
LayersRunner = Callable[..., torch.Tensor]


def run_layers(
    layers: list[nn.Module],
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor | None,
    positions: torch.Tensor,
    mask: torch.Tensor,
    keys_windows: list[torch.Tensor | None],
    values_windows: list[torch.Tensor | None],
    *,
    block: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """The layers one after another (Transformer.run's default LayersRunner); `block(layer, *args)` runs
    each where given (model/static_step.py's nested compile region)."""
    for layer, keys, values in zip(layers, keys_windows, values_windows):
        args = (h, cos, sin, slots, positions, mask, keys, values)
        h = layer(*args) if block is None else block(layer, *args)
    return h


class Transformer(nn.Module):
    """Token ids in, fp32 logits out. Build on the meta device, load weights, then `setup_cache`."""

    # Buffers registered by setup_cache (absent before it): declared so that they read as tensors.
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.cache_len = 0  # positions per slot in the cache: max_seq_len, rounded up to KV_BLOCK when batch invariant
        self.decode_key_block = 1  # decode reads keys in multiples of this when batch invariant (decode_key_block)
        self.decode_attention_kernel = "plain ops"  # or our kernel's (native_decode_attention), set by setup_cache
        self.batch_invariant = False
        self.head_tile = 0  # rows per head GEMM in decode when batch invariant (invariance.row_tile) ...
        self.head_column_tiles: tuple[int, ...] = ()  # ... or column tiles of a transposed head GEMM (head_tiles)
        self.quantized_head: Q8Head | None = None  # int8 decode head (model/q8_head.py), set before setup_cache

    def setup_cache(self, max_batch_size: int, max_seq_len: int, *, batch_invariant: bool = False) -> None:
        """Allocate the slot cache and RoPE tables once, on the weights' device and dtype.

        batch_invariant: decode rows compute the head in fixed row tiles and attention reads whole
        KV_BLOCKs of keys (model/invariance.py; the linear layers are swapped by
        `make_batch_invariant`), so the cache holds a whole number of blocks. Each slot has one more
        position past those, `scratch_position`, never read: where the rows that pad a decode batch
        to a fixed shape (model/static_step.py) write their keys.
        """
        weight = self.tok_embeddings.weight
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.batch_invariant = batch_invariant
        self.head_column_tiles = head_tiles(self.head_weight()) if batch_invariant and self.quantized_head is None else ()
        self.head_tile = row_tile(self.head_weight()) if batch_invariant and not self.head_column_tiles else 0
        self.cache_len = round_up(max_seq_len, KV_BLOCK) if batch_invariant else max_seq_len
        args = self.args
        self.decode_key_block = (
            decode_key_block(args.n_heads, args.n_kv_heads, args.head_dim, weight.dtype, weight.device) if batch_invariant else 1
        )
        native, self.decode_attention_kernel = native_decode_attention(
            args.n_heads, args.n_kv_heads, args.head_dim, weight.dtype, weight.device
        )
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock)  # nn.ModuleList yields plain Modules
            layer.attention.native_decode = native
            layer.attention.cache = KVCache(
                max_batch_size, self.cache_len + 1, self.args.n_kv_heads, self.args.head_dim, weight.dtype, weight.device
            )
        cos, sin = rope_tables(self.args, self.scratch_position + 1, weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def scratch_position(self) -> int:
        """The spare cache position of every slot (see setup_cache): past any key a query reads."""
        return self.cache_len

    def check_inputs(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None, kv_len: int | None) -> int:
        """The kv_len to use; bad input is an error here, not an index error deep in the cache or,
        worse (kv_len too small), queries that silently miss their own keys. Columns at the scratch
        position are padding (several prompts' chunks in one forward): their keys are never read."""
        if tokens.dim() != 2 or tokens.shape != positions.shape or tokens.numel() == 0:
            raise ValueError(
                f"tokens {list(tokens.shape)} and positions {list(positions.shape)} must be the same (B, T) shape, T >= 1"
            )
        if slots is not None and slots.shape != positions.shape[:1]:
            raise ValueError(f"slots {list(slots.shape)} must be one per row ({positions.shape[0]})")
        if positions.device.type != "cpu":  # value checks would cost a device sync every step
            return kv_len if kv_len is not None else int(positions.max()) + 1
        rows = positions.shape[0] if slots is None else int(slots.max()) + 1
        if rows > self.max_batch_size or (slots is not None and int(slots.min()) < 0):
            raise ValueError(f"slots must be in [0, {self.max_batch_size}) (slots=None: one row per slot)")
        real = positions[positions != self.scratch_position]  # the rest pad a packed prefill (invariance.packed_prefill_inputs)
        if real.numel() == 0:
            raise ValueError("every position is the scratch position: nothing to compute")
        low, high = int(real.min()), int(real.max())
        if low < 0 or high >= self.max_seq_len:
            raise ValueError(f"positions must be in [0, {self.max_seq_len}), got {low}..{high}")
        if kv_len is None:
            return high + 1
        if not high < kv_len <= self.max_seq_len:
            raise ValueError(f"kv_len {kv_len} must be in ({high}, {self.max_seq_len}]: above the max position, within the cache")
        return kv_len

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor | None = None,
        *,
        kv_len: int | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run `tokens` (B, T) at `positions` (B, T), row b writing KV-cache slot `slots[b]`.

        slots=None means row b uses slot b. kv_len bounds the keys read (default: max position + 1);
        each query attends to the keys of its own slot at positions <= its own. Returns fp32 logits
        (B, V) for the last column, or (B, T, V) with all_logits.
        """
        kv_len = self.check_inputs(tokens, positions, slots, kv_len)
        if self.batch_invariant:  # whole key blocks: the keys other rows need change nothing (invariance.py)
            kv_len = min(round_up(kv_len, self.decode_key_block if tokens.shape[1] == 1 else KV_BLOCK), self.cache_len)
        columns = tokens.shape[1]
        if columns >= PREFILL_PAD_FROM and columns % PREFILL_ROW_BLOCK:
            tokens, positions = self.pad_columns(tokens, positions, round_up(columns, PREFILL_ROW_BLOCK))
        first_slot = 0 if slots is None else first_of_run(slots)  # consecutive slots: read in place, not gathered
        if first_slot is not None:
            slots = None
        logits = self.run(tokens, positions, slots, kv_len, all_logits=all_logits, columns=columns, first_slot=first_slot or 0)
        return logits[:, :columns] if all_logits else logits

    def pad_columns(self, tokens: torch.Tensor, positions: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and positions padded on the right to `width` columns; pad columns sit at the scratch
        position, whose keys no query reads, so they change no real column."""
        pad = width - tokens.shape[1]
        tokens = F.pad(tokens, (0, pad))
        positions = F.pad(positions, (0, pad), value=self.scratch_position)
        return tokens, positions

    @torch.inference_mode()
    def run(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor | None,
        kv_len: int,
        *,
        all_logits: bool = False,
        layers: LayersRunner = run_layers,
        rows: int | torch.Tensor | None = None,
        columns: int | None = None,
        first_slot: int = 0,
    ) -> torch.Tensor:
        """`forward` past its checks, on inputs already checked (model/static_step.py calls it too).

        The mask and RoPE tables are built once per step, not per layer. `layers` runs the layers
        (default: one after another; StaticStep passes its compiled stack); rows keeps the logits of the
        first `rows` rows only, or of the rows at those indices (the rest pad the batch to a fixed
        shape), and `columns` says how many columns are real (the last real one gives the logits; the
        rest pad the chunk: forward). With slots=None, row b uses slot first_slot + b.
        """
        key_positions = torch.arange(kv_len, device=tokens.device)
        mask = (key_positions[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, kv_len)
        cos = self.rope_cos[positions][:, None]
        sin = self.rope_sin[positions][:, None]
        h = self.tok_embeddings(tokens)
        keys_windows: list[torch.Tensor | None] = []
        values_windows: list[torch.Tensor | None] = []
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock) and layer.attention.cache is not None, "setup_cache() first"
            # slots=None: row b is slot first_slot + b, read in place through views of those slots.
            keys, values = (None, None) if slots is not None else layer.attention.cache.window(first_slot, tokens.shape[0])
            keys_windows.append(keys)
            values_windows.append(values)
        h = layers(list(self.layers), h, cos, sin, slots, positions, mask, keys_windows, values_windows)
        h = h.index_select(0, rows) if isinstance(rows, torch.Tensor) else h[:rows]
        h = self.norm(h if all_logits else h[:, (columns or tokens.shape[1]) - 1])
        # Decode rows, and the last column of prefill rows (several prompts may share a forward): the int8 head
        # where there is one (its rows are independent by construction), else fixed-shape GEMMs if invariant.
        if (self.quantized_head is not None or self.batch_invariant) and (tokens.shape[1] == 1 or not all_logits):
            rows_2d = h.reshape(-1, h.shape[-1])  # (B, D); (B, 1, D) when every position's logits are asked for
            if self.quantized_head is not None:
                logits = self.quantized_head(rows_2d)
            elif self.head_column_tiles:
                logits = head_logits(rows_2d, self.head_weight(), self.head_column_tiles)
            else:
                logits = tiled_linear(rows_2d, self.head_weight(), None, self.head_tile)
            return logits.reshape(*h.shape[:-1], -1).float()
        return F.linear(h, self.head_weight()).float()

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Every layer's keys and values of positions [0, length) from slot `source` to slot `target`."""
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock) and layer.attention.cache is not None
            layer.attention.cache.copy_prefix(source, target, length)

    def fuse_projections(self) -> None:
        """Stack wq/wk/wv and w1/w3 into one layer each (after loading: checkpoints name them apart).

        Decode on a CPU is one small GEMM after another; fewer, larger ones read the activations once
        and cut the kernel calls per token from 7 to 4 per layer.
        """
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock)
            layer.attention.fuse()
            layer.feed_forward.fuse()

    def head_weight(self) -> torch.Tensor:
        """The output projection: its own weight, or the token embeddings when tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @property
    def vocab_size(self) -> int:
        """Rows of the logits. Read-only: this and `device` are what the engine's model protocol
        (app/engine/model_runner.CausalLM) reads, so it never reaches into `args` or the weights."""
        return self.args.vocab_size

    @property
    def device(self) -> torch.device:
        """Where the weights live, read-only (the engine builds its input tensors there)."""
        return self.tok_embeddings.weight.device
