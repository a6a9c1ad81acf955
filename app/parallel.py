"""The server's tensor-parallel ranks: start them, load in turn, watch them, stop them.

`--tensor-parallel-size N` makes this process rank 0 (HTTP, scheduler, sampling) and spawns ranks
1..N-1, which load their shard and follow rank 0's broadcasts (model/tensor_parallel.py). Under
`torchrun --nproc-per-node N python -m app` the launcher starts every rank instead: rank 0 serves,
the others go straight to `follower_main`.

A follower that dies is seen at once: rank 0 waits on the processes' sentinels, and the server turns
/health red and exits non-zero instead of waiting on a collective that cannot complete.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from app.config import Settings

log = logging.getLogger("llamaserve")

STOP_TIMEOUT_S = 10.0  # followers exit this soon after rank 0's stop, else they are killed


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world) when a launcher such as torchrun started this process as one of several, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "RANK" in os.environ and "MASTER_PORT" in os.environ:
        return int(os.environ["RANK"]), world
    return None


def world_size(settings: Settings) -> int:
    launched = torchrun_rank()
    return launched[1] if launched else settings.tensor_parallel_size


def rank_threads(settings: Settings, world: int) -> int | None:
    """Each rank's torch threads: as set (per process), else the cores this process may run on shared
    out (N ranks with all cores each would oversubscribe them, and spinning OpenMP threads then slow
    everyone)."""
    if settings.threads:
        return settings.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // world) if world > 1 else None


class ParallelRanks:
    """Rank 0's handle on the others: the rendezvous, the followers it spawned, and its leader model."""

    def __init__(self, settings: Settings, world: int, on_death: Callable[[str], None]) -> None:
        """on_death(reason) is called from a watcher thread if a spawned rank exits before `stop` (a
        crash while loading included: rank 0 would otherwise wait at the rendezvous for ever)."""
        self.settings = settings
        self.world = world
        self.on_death = on_death
        self.address: str | None = None  # tcp rendezvous of spawned ranks; None under torchrun (env://)
        self.processes: list[Any] = []
        self.leader: Any = None  # model.tensor_parallel.ParallelLeader, once loaded
        self._stopping = threading.Event()

    def spawn(self, model_path: str) -> None:
        """Start ranks 1..world-1 (unless a launcher did): each joins the group, waits for rank 0 to load, loads its shard."""
        if torchrun_rank() is not None:
            return
        self.address = f"127.0.0.1:{free_port()}"
        context = multiprocessing.get_context("spawn")  # never fork a process that has started torch's threads
        settings_json = self.settings.model_copy(update={"model": model_path}).model_dump_json()
        for rank in range(1, self.world):
            process = context.Process(
                target=follower_main,
                args=(settings_json, rank, self.world, self.address),
                name=f"llamaserve-rank{rank}",
                daemon=True,
            )
            process.start()
            self.processes.append(process)
        log.info("tensor parallel: started %d follower rank(s), rendezvous %s", len(self.processes), self.address)
        self._watch()

    def _watch(self) -> None:
        def wait() -> None:
            sentinels = {process.sentinel: process for process in self.processes}
            ready = multiprocessing.connection.wait(list(sentinels))
            if self._stopping.is_set():
                return
            process = sentinels[ready[0]]
            process.join(timeout=1)
            self.on_death(f"tensor-parallel rank {self.processes.index(process) + 1} exited (code {process.exitcode})")

        threading.Thread(target=wait, name="llamaserve-rank-watch", daemon=True).start()

    def stop(self) -> None:
        """Release the followers (after the engine stopped), then reap them: those still running after
        STOP_TIMEOUT_S (all together) are killed. A step still holding the group (the engine thread
        stuck in a collective) gets a few seconds; then the followers are killed without a word."""
        self._stopping.set()
        if self.leader is not None and all(process.is_alive() for process in self.processes):
            try:
                if not self.leader.stop():
                    log.warning("tensor parallel: a step still holds the ranks; stopping them by force")
            except Exception as e:  # noqa: BLE001 - a rank already gone: the processes are reaped below
                log.warning("tensor parallel: could not tell the followers to stop: %s", e)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("tensor parallel: %s did not exit; killing it", process.name)
                process.kill()
                process.join()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def load_shard(settings: Settings, rank: int, world: int, address: str | None, model_path: str) -> Any:
    """Join the group and load this rank's shard, rank 0 first: it may write the GGUF weight cache
    that the others then read, and two ranks must not write one file. Rank 0 gets a LoadedModel
    (with the tokenizer), the others only the weights."""
    import torch.distributed as dist

    import model.checkpoint as checkpoint
    from model.tensor_parallel import device_for_rank, init_group

    device = device_for_rank(settings.resolved_device(), rank)
    init_group(rank, world, device, address)
    if rank:
        dist.barrier()
    load = checkpoint.load_weights if rank else checkpoint.load_model
    loaded = load(model_path, device=device, tensor_parallel=(rank, world), **settings.load_options())
    if not rank:
        dist.barrier()
    return loaded


def follower_main(settings_json: str, rank: int, world: int, address: str | None) -> None:
    """A follower rank's process: load the shard, then run rank 0's calls until it says stop."""
    from model.memory import configure_memory
    from model.threads import configure_threads

    settings = Settings.model_validate_json(settings_json)
    # Ctrl-C and a supervisor's SIGTERM reach the whole process group; rank 0 drains on them and needs
    # this rank until its STOP, so only that (or SIGKILL) ends a follower. And it dies with its parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent()
    configure_memory()
    configure_threads(rank_threads(settings, world))
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s", stream=sys.stderr
    )
    from model.tensor_parallel import follow

    assert settings.model is not None, "rank 0 passes the resolved model path"
    loaded = load_shard(settings, rank, world, address, settings.model)
    calls = follow(loaded.model)
    log.info("tensor parallel: rank %d stopped after %d calls", rank, calls)


def follower_main_from_torchrun(settings: Settings) -> int:
    """A non-zero torchrun rank: follow rank 0 with the same settings (the model path must be given)."""
    launched = torchrun_rank()
    assert launched is not None
    if settings.model is None:  # rank 0 fetches it, if need be, before the others load (load_shard)
        from model.fetch import default_model_path

        settings = settings.model_copy(update={"model": str(default_model_path(Path(settings.cache_dir)))})
    follower_main(settings.model_dump_json(), launched[0], launched[1], None)
    return 0


def exit_with_parent(poll_s: float = 1.0) -> None:
    """End this process soon after its parent is gone, so an orphaned rank never holds a GPU or a port
    (a thread watching the parent pid: prctl's PR_SET_PDEATHSIG would fire when the parent *thread*
    that spawned us exits, and rank 0 spawns from a short-lived loading thread)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="llamaserve-parent-watch", daemon=True).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
