"""Replicas behind a real load balancer: Debian's HAProxy with deploy/haproxy/haproxy.cfg in front of two
servers (the default model), a rolling restart under streaming load, and not one client-visible error."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.support.api import free_port, parse_sse, wait_healthy

CONFIG = Path(__file__).parent.parent / "deploy" / "haproxy" / "haproxy.cfg"
DRAIN_TIMEOUT_S = 10.0
MODEL = "SmolLM2-135M-Instruct"


def haproxy() -> str:
    path = shutil.which("haproxy")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is missing: .ci/run installs it with apt")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    return path


class Replica:
    """One `python -m app` process on a fixed port, restartable on the same port."""

    def __init__(self, model: Path, port: int, log_dir: Path, name: str) -> None:
        self.model, self.port, self.log_dir, self.name = model, port, log_dir, name
        self.proc: subprocess.Popen[Any] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        command = [sys.executable, "-m", "app", "--model", str(self.model), "--port", str(self.port), "--no-compile"]
        command += ["--max-batch-size", "4", "--max-seq-len", "256", "--drain-timeout", str(DRAIN_TIMEOUT_S), "--threads", "1"]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        assert self.proc is not None
        wait_healthy(self.url, self.proc, self.log, timeout=90)

    def running(self) -> float:
        """Requests holding a slot right now, from /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        line = next(line for line in text.splitlines() if line.startswith("llamaserve_requests_running "))
        return float(line.split()[1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class Load:
    """Client threads sending streamed and plain completions through the balancer until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def burst(self, requests: int) -> None:
        """That many plain requests at once, counted with the rest."""

        def send(i: int) -> None:
            with httpx.Client(base_url=self.url, timeout=60) as client:
                self._send(client, {"model": MODEL, "prompt": f"Burst {i}", "max_tokens": 4, "stream": False})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                stream = (index + n) % 2 == 0
                self._send(
                    client, {"model": MODEL, "prompt": f"Story {index}-{n}: once upon a time", "max_tokens": 16, "stream": stream}
                )

    def _send(self, client: httpx.Client, body: dict[str, Any]) -> None:
        """One request, counted as ok or as an error."""
        try:
            error = self._one(client, body)
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        with self._lock:
            if error:
                self.errors.append(error)
            else:
                self.ok += 1

    @staticmethod
    def _one(client: httpx.Client, body: dict[str, Any]) -> str | None:
        response = client.post("/v1/completions", json=body)
        if response.status_code != 200:
            return f"{response.status_code}: {response.text[:200]}"
        if body["stream"]:
            events, done, _ = parse_sse(response.text)
            finished = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
            if not done or not finished or finished[-1] not in ("stop", "length"):
                return f"incomplete stream: {response.text[-300:]}"
        elif response.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
            return f"bad finish: {response.text[:200]}"
        return None


@pytest.fixture
def balanced(smollm2_path: Path, tmp_path: Path) -> Iterator[tuple[str, str, list[Replica]]]:
    binary = haproxy()
    replicas = [Replica(smollm2_path, free_port(), tmp_path, f"replica{i + 1}") for i in range(2)]
    for replica in replicas:
        replica.start()
    lb_port, stats_port = free_port(), free_port()
    env = {**os.environ, "LLAMASERVE_LB_BIND": f"127.0.0.1:{lb_port}", "LLAMASERVE_LB_STATS_BIND": f"127.0.0.1:{stats_port}"}
    env.update({f"LLAMASERVE_REPLICA_{i + 1}": f"127.0.0.1:{r.port}" for i, r in enumerate(replicas)})
    lb_log = tmp_path / "haproxy.log"
    with lb_log.open("w") as out:
        lb = subprocess.Popen([binary, "-db", "-f", str(CONFIG)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        for replica in replicas:
            replica.wait_ready()
        url = f"http://127.0.0.1:{lb_port}"
        deadline = time.monotonic() + 20
        while not _served(url):
            assert lb.poll() is None and time.monotonic() < deadline, lb_log.read_text()
            time.sleep(0.2)
        yield url, f"http://127.0.0.1:{stats_port}", replicas
    finally:
        lb.kill()
        lb.wait(timeout=10)
        for replica in replicas:
            replica.stop()


def wait_all_up(stats: str, names: list[str], timeout: float = 30) -> None:
    """Until haproxy's stats page says every named replica is UP (its health checks passed)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = list(csv.reader(httpx.get(f"{stats}/stats;csv", timeout=5).text.lstrip("# ").splitlines()))
        status = {row[1]: row[rows[0].index("status")] for row in rows[1:] if row and row[0] == "replicas"}
        if all(status.get(name) == "UP" for name in names):
            return
        assert time.monotonic() < deadline, f"replicas not all UP in haproxy: {status}"
        time.sleep(0.1)


def _served(url: str) -> bool:
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def record_exit(proc: subprocess.Popen[Any], exited: list[float]) -> None:
    """Append the time `proc` exits (timed apart from whatever the caller does meanwhile)."""
    proc.wait(timeout=DRAIN_TIMEOUT_S + 30)
    exited.append(time.monotonic())


def test_a_rolling_restart_under_streaming_load_shows_clients_no_error(balanced: tuple[str, str, list[Replica]]) -> None:
    url, stats, replicas = balanced
    names = [f"replica{i + 1}" for i in range(len(replicas))]
    with Load(url, clients=4) as load:
        for replica in replicas:
            wait_all_up(stats, names)  # as in a real roll: the next replica goes once the last is back
            deadline = time.monotonic() + 30
            while replica.running() == 0:  # drain it with requests in flight, the case that matters
                assert time.monotonic() < deadline, "the balancer sent this replica nothing"
                time.sleep(0.05)
            served_before = load.ok
            assert replica.proc is not None
            proc = replica.proc
            exited: list[float] = []
            watcher = threading.Thread(target=record_exit, args=(proc, exited))
            proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            watcher.start()
            load.burst(6)  # lands before the balancer's next health check: some reach the draining replica
            watcher.join(timeout=DRAIN_TIMEOUT_S + 40)
            assert exited and proc.returncode == 0, replica.log.read_text()
            assert exited[0] - stopped <= DRAIN_TIMEOUT_S + 5, "the drained replica overran its drain timeout"
            assert "draining" in replica.log.read_text()
            replica.start()
            replica.wait_ready()
            assert load.ok > served_before  # the other replica kept serving meanwhile
        wait_all_up(stats, names)
        time.sleep(2)
    assert not load.errors, load.errors[:5]
    assert load.ok >= 20
    for replica in replicas:  # each restarted replica took traffic again
        finished = httpx.get(f"{replica.url}/metrics", timeout=5).text
        assert any(
            line.startswith("llamaserve_requests_finished_total{") and float(line.split()[-1]) > 0
            for line in finished.splitlines()
        )
