"""Run a function on N torch.distributed ranks in fresh processes and gather what each returns.

Spawned, not forked (the caller may have started torch's threads), each rank with one thread, and
with a deadline: a rank that hangs fails the caller instead of hanging it. The tensor-parallel tests
and bench/gpu_check.py's tensor-parallel section use it.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import traceback
from typing import Any, Callable

import torch


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def run_ranks(world: int, body: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
    """body(rank, world, address, *args) in `world` spawned processes; the return value of each rank, by rank.

    A rank that raises fails the call with its traceback; one still running at the deadline is killed.
    """
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    address = free_address()
    procs = [ctx.Process(target=_rank_main, args=(body, rank, world, address, args, results)) for rank in range(world)]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        while len(outcomes) < world:
            rank, ok, value = results.get(timeout=timeout)
            outcomes[rank] = (ok, value)
    except queue.Empty:
        raise TimeoutError(f"ranks {sorted(set(range(world)) - set(outcomes))} did not finish in {timeout:.0f} s") from None
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failures = [f"rank {rank}:\n{value}" for rank, (ok, value) in sorted(outcomes.items()) if not ok]
    if failures:
        raise RuntimeError("\n".join(failures))
    return [outcomes[rank][1] for rank in range(world)]


def _rank_main(body: Callable[..., Any], rank: int, world: int, address: str, args: tuple[Any, ...], results: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        value = body(rank, world, address, *args)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - reported to the caller with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
