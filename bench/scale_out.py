"""Tensor parallelism vs replicas on this machine: the figures behind docs/scale-out.md.

    python -m bench.scale_out [--model PATH] [--skip-replicas] [--json out.json]

1. The sum a tensor-parallel step needs twice per layer, between 2 CPU processes: gloo's all_reduce
   vs model/tensor_parallel.exchange_sum (one isend/irecv pair), microseconds per call on a decode
   row's activations.
2. Decode forward, ms per step (batch 1 and 4, eager, int4 as the server runs SmolLM2): one process
   with every core, against 2 tensor-parallel ranks with half the cores each. Same-machine ratio.
3. Replicas over HTTP (needs Debian's haproxy): one server with every core against 2 replicas with
   half the cores each behind deploy/haproxy/haproxy.cfg, bench/loadgen's closed loop at 8 clients:
   aggregate output tok/s and TTFT p50.

Check the load first (two cores: anything else running ruins it). Runs one configuration at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench import loadgen
from bench.ranks import free_address, run_ranks

ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1


def collective_rank(rank: int, world: int, address: str, dim: int, calls: int) -> dict[str, float]:
    """Both sums on a (1, 1, dim) float32 tensor, microseconds per call (after a warm-up)."""
    import torch.distributed as dist

    from model.tensor_parallel import exchange_sum, init_group

    init_group(rank, world, "cpu", address)
    x = torch.randn(1, 1, dim)
    timings = {}
    for name, fn in (("gloo_all_reduce", lambda: dist.all_reduce(x)), ("exchange_sum", lambda: exchange_sum(x))):
        for _ in range(50):
            fn()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        timings[f"{name}_us"] = (time.perf_counter() - start) / calls * 1e6
    return timings


def decode_rank(rank: int, world: int, address: str, model_path: str, threads: int, steps: int) -> dict[str, float]:
    """ms per decode forward at batch 1 and 4, as rank `rank` of `world` (world 1: the model alone)."""
    from model.checkpoint import load_weights
    from model.tensor_parallel import ParallelLeader, follow, init_group

    torch.set_num_threads(threads)
    parallel = None
    if world > 1:
        init_group(rank, world, "cpu", address)
        parallel = (rank, world)
    shard = load_weights(model_path, max_batch_size=4, max_seq_len=512, quantization="auto", tensor_parallel=parallel).model
    if rank:
        follow(shard)
        return {}
    model: Any = ParallelLeader(shard) if world > 1 else shard
    result = {}
    for batch in (1, 4):
        tokens = torch.full((batch, 1), 5)
        for i in range(5):
            model(tokens, torch.full((batch, 1), i), None, kv_len=i + 1)
        start = time.perf_counter()
        for i in range(5, 5 + steps):
            model(tokens, torch.full((batch, 1), i), None, kv_len=i + 1)
        result[f"batch{batch}_ms"] = (time.perf_counter() - start) / steps * 1000
    if world > 1:
        model.stop()
    return result


def _decode_alone(model_path: str, threads: int, steps: int) -> dict[str, float]:
    """decode_rank as a lone process (its own interpreter, like each rank's)."""
    return run_ranks(1, decode_rank, model_path, threads, steps, timeout=600)[0]


def start_server(model_path: str, port: int, threads: int, log: Path) -> subprocess.Popen[Any]:
    command = [sys.executable, "-m", "app", "--model", model_path, "--port", str(port), "--threads", str(threads)]
    command += ["--max-batch-size", "8", "--max-seq-len", "512"]
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_ready(url: str, proc: subprocess.Popen[Any], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready in {timeout:.0f} s")


def measure_http(url: str, clients: int, requests: int, output_tokens: int) -> dict[str, Any]:
    lengths = {"prompt_tokens": (128, 128), "output_tokens": (output_tokens, output_tokens)}
    workload = loadgen.Workload(num_requests=requests, concurrency=clients, **lengths)
    report = asyncio.run(loadgen.measure(url, workload, label=url, warmup=2))
    return {
        "output_tok_s": round(report["output_tok_s"], 1),
        "ttft_p50_ms": report["ttft_ms"]["p50"],
        "errors": report["errors"],
        "completed": report["completed"],
    }


def replicas(model_path: str, clients: int, requests: int, output_tokens: int) -> dict[str, Any]:
    """One server with every core, then 2 replicas behind haproxy with half the cores each."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        return {"skipped": "haproxy not installed (apt-get install haproxy)"}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        port = int(free_address().rsplit(":", 1)[1])
        proc = start_server(model_path, port, CORES, Path(tmp) / "single.log")
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc)
            out["one_server"] = measure_http(f"http://127.0.0.1:{port}", clients, requests, output_tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        ports = [int(free_address().rsplit(":", 1)[1]) for _ in range(2)]
        procs = [start_server(model_path, p, max(1, CORES // 2), Path(tmp) / f"replica{i}.log") for i, p in enumerate(ports)]
        lb_port = int(free_address().rsplit(":", 1)[1])
        env = {**os.environ, "LLAMASERVE_LB_BIND": f"127.0.0.1:{lb_port}", "LLAMASERVE_LB_STATS_BIND": free_address()}
        env.update({f"LLAMASERVE_REPLICA_{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)})
        config = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
        lb = subprocess.Popen([haproxy, "-db", "-f", str(config)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            for p, proc in zip(ports, procs):
                wait_ready(f"http://127.0.0.1:{p}", proc)
            time.sleep(1.5)  # haproxy's rise 2 at 0.5 s
            out["two_replicas_haproxy"] = measure_http(f"http://127.0.0.1:{lb_port}", clients, requests, output_tokens)
        finally:
            lb.kill()
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=60)
    one, two = out["one_server"], out["two_replicas_haproxy"]
    out["ratio_tok_s"] = round(two["output_tok_s"] / one["output_tok_s"], 3) if one["output_tok_s"] else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed per configuration")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--skip-replicas", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.model is None:
        from model.fetch import ensure_default_model

        args.model = str(ensure_default_model())
    report: dict[str, Any] = {"cores": CORES, "torch": torch.__version__, "load_average": os.getloadavg()}
    print(f"{CORES} cores, load average {report['load_average']}", flush=True)
    report["collectives"] = run_ranks(2, collective_rank, 576, 2000)[0]
    print("sum of a (1, 1, 576) activation between 2 processes:", report["collectives"], flush=True)
    single = _decode_alone(args.model, CORES, args.steps)
    parallel = run_ranks(2, decode_rank, args.model, max(1, CORES // 2), args.steps, timeout=600)[0]
    report["decode"] = {
        "one_process": single,
        "two_ranks": parallel,
        "ratio_batch1": round(parallel["batch1_ms"] / single["batch1_ms"], 3),
        "ratio_batch4": round(parallel["batch4_ms"] / single["batch4_ms"], 3),
    }
    print("decode ms per step (eager):", report["decode"], flush=True)
    if not args.skip_replicas:
        report["replicas"] = replicas(args.model, args.clients, args.requests, args.output_tokens)
        print("replicas:", report["replicas"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
