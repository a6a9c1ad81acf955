"""Decode steps on bucketed shapes through one compiled graph of the layer stack (gpt-fast compiles its decode step the same way).

Why: at one token per row a CPU step is ~30 layers x ~20 small ops, each dispatched from Python;
Inductor fuses a block's elementwise work (RMSNorm, RoPE, SiLU-mul, residual adds) into a few C++
loops around the GEMM and attention calls, and the dispatch goes away (numbers: docs/performance.md).
The block is a nested compile region: traced and compiled once, then called for every layer with
that layer's weights, so a graph compiles in seconds where inlining all 30 layers took ~75 s on two
cores; and a step enters compiled code once, not once per layer (each entry cost ~60 us of dynamo
frame handling and guard checks: 30 of them were a fifth of a one-row step). Prefill stays eager.

Buckets: the batch is padded up to a bucket (powers of two up to max_batch_size). Padding rows
write their keys at their slot's scratch position (Transformer.setup_cache), which no query reads,
and their logits are dropped before the head. Rows read their keys in place, through views of a
window of `bucket` consecutive slots in which padding rows fill the slots no row holds; gathering
the keys by slot cost a quarter of a one-row step. The engine keeps decoding requests within such a
window (it moves one into a free slot when they spread: app/engine/scheduler.py); rows it could not
bring together run in the smallest bucket whose window holds them. On an accelerator, where finding
the window would read device values every step, rows not on slots 0, 1, ... are gathered (another
graph). Two dimensions are dynamic: the keys read, a multiple of the model's `decode_key_block`
(the mask does the rest), so a longer context costs no recompile; and the rows, above one: one graph
serves every bucket from two rows up (a row's numbers do not depend on how many there are: the GEMM
and attention kernels' rows are independent, Inductor's loops run row by row), and one row has its
own (dynamo specialises a size of 1 anyway), each with its own guards to check. Host-side checks run
before the compiled region, never inside it.

Where Inductor cannot run (no C++ compiler, an unsupported torch) the step falls back to eager and
says why in the log; `--no-compile` turns it off.
"""

from __future__ import annotations

import logging
import shutil
import time
import types
from typing import Any, Callable

import torch

from model.invariance import round_up
from model.kv_cache import first_of_run
from model.llama import Transformer, TransformerBlock, run_layers

log = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below max_batch_size, then max_batch_size itself: each is one compiled shape."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch_size:
        buckets.append(buckets[-1] * 2)
    if buckets[-1] != max_batch_size:
        buckets.append(max_batch_size)
    return buckets


def compile_unavailable(device: torch.device, backend: str) -> str | None:
    """Why torch.compile cannot run here (None: it can). Inductor writes C++ on the CPU, so it needs a compiler."""
    if backend == "inductor" and device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler on PATH (Inductor generates C++ for the CPU; install g++)"
    return None


@torch.compiler.nested_compile_region
def run_block(layer: TransformerBlock, *args: Any) -> torch.Tensor:
    """One layer: traced and compiled once, then called for every layer with that layer's weights
    (a nested compile region; outside torch.compile it is a plain call)."""
    return layer(*args)


def run_stack(*args: Any) -> torch.Tensor:
    """Every layer of a step (a LayersRunner: model/llama.py's run_layers, each layer in run_block), the
    function torch.compile traces: one entry into compiled code a step, where a compiled block was
    entered (and its guards checked) 30 times."""
    return run_layers(*args, block=run_block)


# Guards dynamo checks before every call of the compiled stack: ~700 for SmolLM2's 30 layers (module
# types, hook dicts, attribute constants, every weight's metadata, ...). Only these are kept: the shapes,
# strides, dtypes and devices of the step's own tensors (activations, positions, mask, key windows), the
# symbolic-shape guards of the dynamic key length, and global torch state; ~70 in all. The rest, the
# weights' guards included, catch changes to a model's modules that nothing makes after load; since they
# would also tell one model's graphs from another's, each StaticStep compiles its own copy of run_stack
# (`_own_code`: dynamo keeps graphs per code object). Checking them cost ~0.7 ms a step (one row: ~10 ms).
KEPT_GUARDS = frozenset(
    {"TENSOR_MATCH", "SHAPE_ENV", "DUPLICATE_INPUT", "GRAD_MODE", "GLOBAL_STATE", "DETERMINISTIC_ALGORITHMS"}
    | {"TORCH_FUNCTION_STATE", "DEFAULT_DEVICE", "AUTOGRAD_SAVED_TENSORS_HOOKS"}
)


def keep_guard(entries: Any) -> list[bool]:
    """torch.compile's guard_filter_fn: True for the guards in KEPT_GUARDS on anything but a module's
    attributes (parameters, buffers, constants)."""
    return [entry.guard_type in KEPT_GUARDS and not entry.orig_guard.source.is_unspecialized_nn_module() for entry in entries]


def _own_code(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`function` under a code object of its own, so that its compiled graphs are its own."""
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__)
    copy.__doc__ = function.__doc__
    return copy


class StaticStep:
    """A Transformer's forward (same signature) whose decode steps run on bucketed shapes through a compiled stack.

    compile=False (or a failed compile) keeps the buckets and runs the layers eagerly.
    """

    def __init__(self, model: Transformer, *, compile: bool = True, backend: str = "inductor", mode: str | None = None) -> None:
        self.model = model
        self.max_batch_size, self.max_seq_len = model.max_batch_size, model.max_seq_len
        self.buckets = batch_buckets(model.max_batch_size)
        self.backend, self.mode = backend, mode
        # (one row, more rows): two code objects, so that a step checks only its own graph's guards.
        self.compiled: tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None = None
        self.recompile_limit = 2 * len(self.buckets) + 2
        self.fallback_reason: str | None = None if compile else "turned off (--no-compile)"
        if compile:
            reason = compile_unavailable(model.device, backend)
            if reason is None:
                self.compiled = (self._compile(backend, mode), self._compile(backend, mode))
            else:
                self._fall_back(reason)

    @staticmethod
    def _compile(backend: str, mode: str | None) -> Callable[..., torch.Tensor]:
        """torch.compile of run_stack with the guards filtered (keep_guard). torch.compile takes a mode or
        options, not both, so Inductor's mode comes as the options it stands for."""
        if mode is not None and backend != "inductor":
            return torch.compile(_own_code(run_stack), backend=backend, mode=mode, dynamic=False)
        options: dict[str, Any] = {"guard_filter_fn": keep_guard}
        if backend == "inductor":
            # Its generated wrapper re-checks every tensor's size and stride (26 asserts a layer, in Python),
            # which the tensor guards above already did: one-row step 12.1 -> 11.6 ms (Zen 4).
            options.update(size_asserts=False, alignment_asserts=False)
        if mode is not None:
            options.update(torch._inductor.list_mode_options(mode))
        return torch.compile(_own_code(run_stack), backend=backend, dynamic=False, options=options)

    # -- the engine's model protocol (app/engine/model_runner.CausalLM) --------------------------
    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def batch_invariant(self) -> bool:
        return self.model.batch_invariant

    @property
    def scratch_position(self) -> int:
        return self.model.scratch_position

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor | None = None,
        *,
        kv_len: int | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Transformer.forward: decode (one column, last logits) on a bucket's shapes, anything else eagerly."""
        if tokens.dim() != 2 or tokens.shape[1] != 1 or all_logits:
            return self.model(tokens, positions, slots, kv_len=kv_len, all_logits=all_logits)
        kv_len = self.model.check_inputs(tokens, positions, slots, kv_len)
        bucket = next(b for b in self.buckets if b >= tokens.shape[0])
        kv_len = min(round_up(kv_len, self.model.decode_key_block), self.model.cache_len)
        first = self.window_start(slots, bucket)
        if first is None and slots is not None and slots.device.type == "cpu":
            # Rows spread wider than their bucket (the engine's scheduler moves them together where a free
            # slot allows): the smallest bucket whose window holds them, still in place. The widest bucket
            # spans every slot, so on the CPU nothing is gathered and gathered graphs need no compiling.
            bucket, first = next((b, f) for b in self.buckets if b > bucket and (f := self.window_start(slots, b)) is not None)
        if first is None:
            return self._padded(tokens, positions, slots, bucket, kv_len)
        if slots is None or first_of_run(slots) == first:  # rows on the window's first slots, padding after them
            return self._padded(tokens, positions, None, bucket, kv_len, first)
        return self._in_window(tokens, positions, slots - first, bucket, kv_len, first)

    def window_start(self, slots: torch.Tensor | None, bucket: int) -> int | None:
        """The first of `bucket` consecutive slots that hold every row, or None: the rows' keys are then
        gathered. Within the window each row reads its keys in place and padding rows fill the slots
        between them (a batch of 31 in 32 slots has a hole where a request just ended); gathering the
        keys cost a quarter of a 32-row step here (docs/performance.md)."""
        if slots is None:
            return 0
        if slots.device.type != "cpu":  # reading device values would cost a sync every step
            return None
        values = slots.tolist()
        first = min(min(values), self.max_batch_size - bucket)
        return first if max(values) < first + bucket and len(set(values)) == len(values) else None

    def decode_window(self, rows: int) -> int | None:
        """How many consecutive slots `rows` decode rows must lie within to read their keys in place (their
        bucket), or None where they never do (a cache on an accelerator: finding the window would read
        device values every step). The scheduler keeps decoding requests that close (app/engine/scheduler.py)."""
        return next(b for b in self.buckets if b >= rows) if self.model.device.type == "cpu" else None

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        self.model.copy_prefix(source, target, length)

    def warm_up(self, progress: Callable[[int, int, int, float], None] | None = None) -> float:
        """Compile every batch bucket now (start-up) rather than on the first request of that size.

        Runs one row at position 0 of slot 0 (what a new request overwrites first), padded to each
        bucket, reading keys in place, and on an accelerator also gathered by slot (a graph each; on the
        CPU rows are always read in place: __call__). progress is called after each bucket with (done,
        total, bucket, seconds). Returns the seconds it took.
        """
        start = time.monotonic()
        zero = torch.zeros(1, 1, dtype=torch.long, device=self.model.device)
        # At least 2 keys: a key length of 1 would be specialised (dynamo's 0/1 rule) and the first real step recompile.
        kv_len = min(max(2, self.model.decode_key_block), self.model.cache_len)
        ways = (None,) if self.model.device.type == "cpu" else (None, zero[0])
        for done, bucket in enumerate(self.buckets, 1):
            t = time.monotonic()
            for slots in ways:
                self._padded(zero, zero, slots, bucket, kv_len)
            if progress is not None:
                progress(done, len(self.buckets), bucket, time.monotonic() - t)
        return time.monotonic() - start

    @torch.inference_mode()
    def _padded(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None, bucket: int, kv_len: int, first: int = 0
    ) -> torch.Tensor:
        """The decode step on `bucket` rows. Padding rows hold token 0 at the scratch position of the
        next slots (slots=None: row b is slot first + b, keys read in place) or of row 0's slot (keys gathered)."""
        # Up to two graphs per bucket, all kept (dynamo's default limit is 8 per function). Dynamo's config
        # is per thread, and the engine's thread is not the one that built this.
        if self.compiled is not None and torch._dynamo.config.recompile_limit < self.recompile_limit:
            torch._dynamo.config.recompile_limit = self.recompile_limit
        rows, pad = tokens.shape[0], bucket - tokens.shape[0]
        # Always new tensors, made here in inference mode: the graphs are guarded on that too.
        tokens = torch.cat([tokens, tokens.new_zeros(pad, 1)])
        positions = torch.cat([positions, positions.new_full((pad, 1), self.model.scratch_position)])
        if slots is not None:
            slots = torch.cat([slots, slots[:1].expand(pad)])
        return self.model.run(tokens, positions, slots, kv_len, layers=self._layers, rows=rows, first_slot=first)

    @torch.inference_mode()
    def _in_window(
        self, tokens: torch.Tensor, positions: torch.Tensor, offsets: torch.Tensor, bucket: int, kv_len: int, first: int
    ) -> torch.Tensor:
        """The decode step on the `bucket` slots from `first`: row i sits at offsets[i] of the window, and
        padding rows (token 0 at the scratch position) fill the rest; the logits come back in row order."""
        if self.compiled is not None and torch._dynamo.config.recompile_limit < self.recompile_limit:
            torch._dynamo.config.recompile_limit = self.recompile_limit
        placed_tokens = tokens.new_zeros(bucket, 1).index_copy_(0, offsets, tokens)
        placed_positions = positions.new_full((bucket, 1), self.model.scratch_position).index_copy_(0, offsets, positions)
        return self.model.run(placed_tokens, placed_positions, None, kv_len, layers=self._layers, rows=offsets, first_slot=first)

    def _layers(self, *args: Any) -> torch.Tensor:
        """run_stack, compiled where it can be (args: model/llama.py's LayersRunner)."""
        if self.compiled is None:
            return run_stack(*args)
        _, h, cos, sin, slots, positions, mask, keys_windows, values_windows = args
        torch._dynamo.maybe_mark_dynamic(mask, 3)  # keys read: one graph for every multiple of the key block
        if h.shape[0] > 1:  # and every bucket above one row: one graph (one row has its own, dynamo's 0/1 rule)
            for tensor in (h, cos, sin, slots, positions, mask, *keys_windows, *values_windows):
                if tensor is not None:
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)
        one_row, more_rows = self.compiled
        try:
            return (more_rows if h.shape[0] > 1 else one_row)(*args)
        except Exception as e:  # noqa: BLE001 - a backend failure (compiler error, unsupported op) costs speed, not service
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            self._fall_back(f"{type(e).__name__}: {' '.join(lines[:3])}"[:300])
            return run_stack(*args)

    def _fall_back(self, reason: str) -> None:
        self.compiled, self.fallback_reason = None, reason
        log.warning("decode step runs eagerly: %s", reason)
