"""The real server with `--tensor-parallel-size 2` and the default model: it serves, it stops its
follower rank on SIGTERM, and it exits (instead of hanging) when the follower dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.support.api import free_port, parse_sse, wait_healthy
from tests.support.oracle import GOLDEN_PROMPT


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def follower_pids(pid: int) -> list[int]:
    """The server's spawned ranks (not multiprocessing's resource tracker, also a child)."""
    return [child for child in children(pid) if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes()]


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie awaiting its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def tp_server(smollm2_path: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[Any], Path]]:
    """A 2-rank server in float32 (exact enough for the golden tokens), eager, 2 slots."""
    port = free_port()
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "app", "--model", str(smollm2_path), "--port", str(port), "--tensor-parallel-size", "2"]
    command += ["--quantization", "none", "--no-compile", "--max-batch-size", "2", "--max-seq-len", "256", "--drain-timeout", "5"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    followers: list[int] = []
    try:
        wait_healthy(url, proc, log, timeout=120)
        followers = follower_pids(proc.pid)  # now, while they are the server's children
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for pid in followers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_two_ranks_serve_the_golden_answer_stream_and_stop_together(tp_server: tuple[str, subprocess.Popen[Any], Path]) -> None:
    url, proc, log = tp_server
    followers = follower_pids(proc.pid)
    assert len(followers) == 1, log.read_text()
    body = {"model": "SmolLM2-135M-Instruct", "prompt": GOLDEN_PROMPT, "max_tokens": 20, "temperature": 0}
    choice = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("The capital of France is Paris.", "stop")  # transformers' tokens

    chat = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}
    events, done, _ = parse_sse(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).text)
    assert done and "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
    deadline = time.monotonic() + 10
    while alive(followers[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(followers[0]), "the follower rank outlived the server"
    assert "rank 1 stopped after" in log.read_text()


def test_a_dead_rank_turns_health_red_and_the_server_exits(tp_server: tuple[str, subprocess.Popen[Any], Path]) -> None:
    url, proc, log = tp_server
    (follower,) = follower_pids(proc.pid)
    os.kill(follower, signal.SIGKILL)
    codes = []
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            codes.append(httpx.get(f"{url}/health", timeout=1).status_code)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    assert proc.poll() == 1, f"the server did not exit non-zero: {log.read_text()}"
    if 503 in codes:  # once it noticed, never healthy again (it may also exit before a poll sees it)
        assert 200 not in codes[codes.index(503) :], codes
    assert "tensor-parallel rank 1 exited" in log.read_text()


def test_under_torchrun_rank_0_serves_and_the_others_follow(smollm2_path: Path, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m app`: the launcher starts both ranks; SIGTERM to it stops them all."""
    port, master = free_port(), free_port()
    log = tmp_path / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(master), "-m", "app", "--model", str(smollm2_path)]
    command += ["--port", str(port), "--quantization", "none", "--no-compile", "--max-batch-size", "2", "--max-seq-len", "256"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log, timeout=120)
        ranks = children(proc.pid)
        assert len(ranks) == 2, log.read_text()
        body = {"model": "SmolLM2-135M-Instruct", "prompt": GOLDEN_PROMPT, "max_tokens": 20, "temperature": 0}
        choice = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        assert choice["text"] == "The capital of France is Paris."
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in ranks), log.read_text()
        assert "rank 1 stopped after" in log.read_text()  # released by rank 0's STOP, not killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
