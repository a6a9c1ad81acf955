"""Tensor parallelism over torch.distributed: one model sharded Megatron-style across N processes.

Why this shape (Meta's llama3 `model.py` shards the same way with fairscale; vLLM's `parallel_state`
and gpt-fast's `tp.py` are the models): each rank holds a slice of every layer and the ranks exchange
one all-reduce per attention and one per feed-forward, so a model too big for one device (or one
socket's memory bandwidth) runs as if it were one.

- Attention is split by heads. The query heads that share a key/value head stay on one rank, so
  grouped-query attention runs locally: with at least as many KV heads as ranks, each rank takes a
  contiguous run of KV heads and their query heads; with fewer, each KV head is replicated on
  `world / n_kv_heads` ranks and its query heads are shared out among them. Uneven counts are allowed
  (SmolLM2's 9 query / 3 KV heads split 6 + 3 over two ranks).
- wq/wk/wv and w1/w3 are column-parallel (each rank computes some outputs), wo and w2 row-parallel
  (each rank computes a partial sum of every output), followed by one all-reduce each.
- Embeddings, norms and the output head are replicated: every rank computes the same logits and only
  rank 0 samples. Sharding the head would save memory but add an all-gather per step.

Rank 0 runs the scheduler: `ParallelLeader` broadcasts every forward's inputs (the step's plan, as
tensors) and every prefix copy to the other ranks, which run `follow` until told to stop. A rank that
dies closes its sockets, so the others' next collective raises instead of waiting.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.args import ModelArgs
from model.errors import CheckpointError

log = logging.getLogger(__name__)

QUANT_GROUP = 32  # split the feed-forward on int4 group boundaries (model/quant.GROUP_SIZE) when the width allows
# Collectives wait this long: long, because an idle server's followers wait in a broadcast for the next
# step (the leader's heartbeat renews it). A rank that dies is noticed at once anyway: gloo's sockets
# close, and the server watches the processes it spawned.
COLLECTIVE_TIMEOUT = timedelta(days=7)
HEARTBEAT_S = 600.0  # an idle leader sends a no-op this often: followers never wait a whole COLLECTIVE_TIMEOUT

_OP_FORWARD, _OP_COPY_PREFIX, _OP_STOP, _OP_CHECK_ROWS, _OP_NOOP = 1, 2, 3, 4, 5
_HEADER = 8  # int64s: op, then the op's scalars


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` runs; the first ones get the extra."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class ShardPlan:
    """Which heads and feed-forward columns one rank holds; [start, stop) ranges of the full model's."""

    rank: int
    world: int
    head_dim: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    hidden: tuple[int, int]

    @classmethod
    def build(cls, args: ModelArgs, rank: int, world: int) -> ShardPlan:
        """The plan for `rank` of `world`; ValueError naming the counts that do not split."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        heads, kv_heads = args.n_heads, args.n_kv_heads
        group = heads // kv_heads  # query heads per KV head
        if kv_heads >= world:
            kv = split_evenly(kv_heads, world, rank)
            q = (kv[0] * group, kv[1] * group)
        elif world % kv_heads == 0 and group % (world // kv_heads) == 0:
            replicas = world // kv_heads  # ranks that share one KV head
            kv_head, share = rank // replicas, group // replicas
            start = kv_head * group + (rank % replicas) * share
            kv, q = (kv_head, kv_head + 1), (start, start + share)
        else:
            raise ValueError(
                f"{heads} query heads in groups of {group} over {kv_heads} KV heads do not split over {world} ranks "
                f"(the rank count must divide the KV heads, or be a multiple of them that divides each group)"
            )
        unit = QUANT_GROUP if args.hidden_dim % QUANT_GROUP == 0 and args.hidden_dim // QUANT_GROUP >= world else 1
        if args.hidden_dim // unit < world:
            raise ValueError(f"a feed-forward of {args.hidden_dim} columns does not split over {world} ranks")
        lo, hi = split_evenly(args.hidden_dim // unit, world, rank)
        return cls(rank, world, args.head_dim, q, kv, (lo * unit, hi * unit))

    def is_even_split(self, args: ModelArgs) -> bool:
        """Whether this rank's heads and columns are the r-th of `world` equal parts: Meta's split
        (fairscale's column- and row-parallel layers), so Meta's shard r is this rank's slice."""

        def even(total: int, got: tuple[int, int]) -> bool:
            part = total // self.world
            return total % self.world == 0 and got == (self.rank * part, (self.rank + 1) * part)

        return even(args.n_heads, self.q_heads) and even(args.n_kv_heads, self.kv_heads) and even(args.hidden_dim, self.hidden)

    def local_args(self, args: ModelArgs) -> ModelArgs:
        """The hyper-parameters of this rank's slice: what its Transformer is built with."""
        return dataclasses.replace(
            args,
            n_heads=self.q_heads[1] - self.q_heads[0],
            n_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            hidden_dim=self.hidden[1] - self.hidden[0],
            head_dim=self.head_dim,
        )

    def split(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the slice of tensor `name` (our names, before fusing) on this rank; None: replicated."""
        match = re.fullmatch(r"layers\.\d+\.(attention|feed_forward)\.(w\w+)\.(weight|bias)", name)
        if match is None:
            return None
        layer, kind = match.group(2), match.group(3)
        by_heads = {"wq": self.q_heads, "wk": self.kv_heads, "wv": self.kv_heads, "wo": self.q_heads}
        if layer in by_heads:
            start, stop = by_heads[layer]
            start, stop = start * self.head_dim, stop * self.head_dim
        elif layer in ("w1", "w2", "w3"):
            start, stop = self.hidden
        else:
            return None
        row_parallel = layer in ("wo", "w2")
        if row_parallel and kind == "bias":  # whole on every rank: `shard` keeps it on rank 0 only (see there)
            return None
        return (1 if row_parallel else 0), start, stop

    def shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of `tensor`, copied: a memory-mapped source is read for the slice only."""
        split = self.split(name)
        if split is None and self.rank and re.search(r"\.(wo|w2)\.bias$", name):
            return torch.zeros_like(tensor)  # each rank adds its bias before the sum: only rank 0's may count
        if split is None:
            return tensor
        dim, start, stop = split
        return tensor.narrow(dim, start, stop - start).clone()

    def shard_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor of a full state dict replaced by its slice, one at a time (the full ones are dropped as we go)."""
        return {name: self.shard(name, state.pop(name)) for name in list(state)}


def exchange_sum(part: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The sum of every rank's `part`, by point-to-point exchange, added in rank order on every rank
    (so every rank gets the same bits, as the residual stream requires).

    Why not gloo's all_reduce: on a decode row's activations it took 1.6-1.9 ms on a 2-core VM against
    0.7-0.9 ms for this (bench/scale_out.py; docs/scale-out.md), and a step has two per layer. Each rank
    sends its part to every other, so this is for a few ranks.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    part = part.contiguous()
    parts: list[torch.Tensor] = []
    requests = []
    for peer in range(world):
        if peer == rank:
            parts.append(part)
            continue
        received = torch.empty_like(part)
        requests += [dist.isend(part, peer, group=group), dist.irecv(received, peer, group=group)]
        parts.append(received)
    for request in requests:
        if request is not None:  # None only for a rank outside the group
            request.wait()
    total = parts[0].clone()
    for other in parts[1:]:
        total += other
    return total


def checkpoint_plan(args: ModelArgs, tensor_parallel: tuple[int, int], source: Any) -> ShardPlan:
    """ShardPlan.build for a checkpoint's loader: a shape that does not split is the checkpoint's error."""
    try:
        return ShardPlan.build(args, *tensor_parallel)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


class AllReduced(nn.Module):
    """A row-parallel layer: each rank's partial output, summed over the ranks (NCCL's all-reduce on
    GPUs; between CPU processes, `exchange_sum`)."""

    def __init__(self, inner: nn.Module, group: Any = None) -> None:
        super().__init__()
        self.inner = inner
        self.group = group
        self.pairwise = dist.get_backend(group) == "gloo"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.pairwise:
            return exchange_sum(out, self.group)
        dist.all_reduce(out, group=self.group)
        return out


def parallelize(model: nn.Module, group: Any = None) -> None:
    """Sum the outputs of every layer's wo and w2 across the ranks (after quantization and invariance
    swapped the linear layers: the wrapper holds whatever layer is there)."""
    for layer in model.layers:  # type: ignore[union-attr]
        layer.attention.wo = AllReduced(layer.attention.wo, group)
        layer.feed_forward.w2 = AllReduced(layer.feed_forward.w2, group)


class ParallelLeader:
    """Rank 0's model: each call is sent to the other ranks, then run on this rank's shard.

    It has the engine's model protocol (app/engine/model_runner.CausalLM) plus `copy_prefix` and
    `prefill_rows_independent`, and deliberately no `model` or `layers`: a check that ran the model
    directly would run on rank 0 alone and leave the others waiting in a collective.

    Calls hold a lock, so the collectives of one call never interleave with another thread's: the
    heartbeat's (a no-op sent when the group has been idle for HEARTBEAT_S, so that a follower waiting
    for work never reaches the collective timeout) and the final stop's.
    """

    def __init__(self, shard: Any, group: Any = None, heartbeat_s: float | None = None) -> None:
        self.shard = shard
        self.group = group
        self.max_batch_size: int = shard.max_batch_size
        self.max_seq_len: int = shard.max_seq_len
        self.batch_invariant: bool = getattr(shard, "batch_invariant", False)
        self.stopped = False
        self._lock = threading.Lock()
        self._last_call = time.monotonic()
        self._heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self._done = threading.Event()
        threading.Thread(target=self._heartbeat, name="llamaserve-tp-heartbeat", daemon=True).start()

    @property
    def vocab_size(self) -> int:
        return int(self.shard.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.shard.device

    @property
    def scratch_position(self) -> int:
        return int(self.shard.scratch_position)

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor | None,
        *,
        kv_len: int,
        all_logits: bool = False,
    ) -> torch.Tensor:
        rows, columns = tokens.shape
        with self._lock:
            self._send([_OP_FORWARD, rows, columns, kv_len, int(all_logits), int(slots is not None)])
            dist.broadcast(tokens.contiguous(), src=0, group=self.group)
            dist.broadcast(positions.contiguous(), src=0, group=self.group)
            if slots is not None:
                dist.broadcast(slots.contiguous(), src=0, group=self.group)
            return self.shard(tokens, positions, slots, kv_len=kv_len, all_logits=all_logits)

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        with self._lock:
            self._send([_OP_COPY_PREFIX, source, target, length])
            self.shard.copy_prefix(source, target, length)

    def prefill_rows_independent(self) -> bool:
        """model/invariance.py's check, run on every rank in step (its forwards hold collectives), true
        only if it holds on every rank: each rank's keys and values are its own."""
        with self._lock:
            self._send([_OP_CHECK_ROWS])
            return rows_independent_everywhere(self.shard, self.group)

    def stop(self, wait_s: float = 5.0) -> bool:
        """Release the followers (they return from `follow`); safe to call twice. False when a call
        still held the group after wait_s (a stuck collective): then the caller kills the followers."""
        self._done.set()
        if not self._lock.acquire(timeout=wait_s):
            return False
        try:
            if not self.stopped:
                self.stopped = True
                self._send([_OP_STOP])
            return True
        finally:
            self._lock.release()

    def _heartbeat(self) -> None:
        while not self._done.wait(timeout=min(self._heartbeat_s, 60.0)):
            if time.monotonic() - self._last_call < self._heartbeat_s or not self._lock.acquire(blocking=False):
                continue
            try:
                if not self.stopped:
                    self._send([_OP_NOOP])
            except Exception as e:  # noqa: BLE001 - a dead rank: the server's watcher reports it
                log.warning("tensor parallel: heartbeat failed: %s", e)
                return
            finally:
                self._lock.release()

    def _send(self, values: list[int]) -> None:
        self._last_call = time.monotonic()
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
        header[: len(values)] = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.group)


def follow(shard: Any, group: Any = None) -> int:
    """A follower rank's loop: run what rank 0 broadcasts until it says stop; returns the calls run.

    A forward that rank 0 also rejects (bad inputs: ValueError before any collective) is skipped on
    both sides; any other error ends the loop, and the process, so that rank 0's next collective fails.
    """
    device = shard.device
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    calls = 0
    while True:
        dist.broadcast(header, src=0, group=group)
        op, *values = header.tolist()
        if op == _OP_STOP:
            return calls
        if op == _OP_NOOP:  # the leader's heartbeat
            continue
        calls += 1
        if op == _OP_COPY_PREFIX:
            shard.copy_prefix(values[0], values[1], values[2])
            continue
        if op == _OP_CHECK_ROWS:
            rows_independent_everywhere(shard, group)
            continue
        if op != _OP_FORWARD:
            raise RuntimeError(f"unknown tensor-parallel op {op}")
        rows, columns, kv_len, all_logits, has_slots = values[:5]
        tokens = torch.empty(rows, columns, dtype=torch.int64, device=device)
        positions = torch.empty(rows, columns, dtype=torch.int64, device=device)
        dist.broadcast(tokens, src=0, group=group)
        dist.broadcast(positions, src=0, group=group)
        slots = None
        if has_slots:
            slots = torch.empty(rows, dtype=torch.int64, device=device)
            dist.broadcast(slots, src=0, group=group)
        try:
            shard(tokens, positions, slots, kv_len=kv_len, all_logits=bool(all_logits))
        except ValueError:  # the input checks run before the first collective, so rank 0 raised the same
            pass


def rows_independent_everywhere(shard: Any, group: Any = None) -> bool:
    """`prefill_rows_independent` on this rank's shard, and'ed over the ranks (the minimum of 0/1)."""
    from model.invariance import prefill_rows_independent

    verdict = torch.tensor([int(prefill_rows_independent(shard))], device=shard.device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    return bool(verdict.item())


def backend_for(device: str | torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """torchrun (or any launcher that sets the env:// variables) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "MASTER_PORT" in os.environ


def init_group(rank: int, world: int, device: str | torch.device, address: str | None = None) -> None:
    """Join the default process group: tcp://address (the server's own spawned ranks) or env:// (torchrun)."""
    if dist.is_initialized():
        return
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    init_method = f"tcp://{address}" if address else "env://"
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    log.info("tensor parallel: rank %d of %d joined (%s)", rank, world, dist.get_backend())


def device_for_rank(device: str | torch.device, rank: int) -> torch.device:
    """On CUDA each rank takes its own GPU (cuda -> cuda:rank); on CPU all share the host. ValueError
    for one named GPU (cuda:N): the ranks would all land on it."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"tensor parallelism puts rank r on cuda:r: give --device cuda (or auto), not {device}")
    return torch.device("cuda", rank)
