"""The vLLM and `transformers serve` peers of bench/run_peers.py, the concurrency sweep and issue 17's
targets, against fake start scripts / executables that serve tests/support/fake_server.py."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from bench import run_peers
from tests.support import REPO

# A fake peer server: `fake_peer.py PORT RECORD [strict]`. Serves the fake SSE server with a /health; when
# it is stopped (SIGTERM) it writes its start and stop times and the model ids it was sent. `strict` is
# `transformers serve`'s /v1/completions: 422 for fields outside OpenAI's schema, EOS off only through
# generation_config's eos_token_id -1 (else 3 tokens, an early EOS).
# (At shutdown, in the app's lifespan: uvicorn re-raises the SIGTERM once it has shut down.)
FAKE_PEER = """
import contextlib, json, sys, time
from pathlib import Path
import uvicorn
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from tests.support.fake_server import FakeServer

port, record = int(sys.argv[1]), Path(sys.argv[2])
started = time.time()

async def health(request):
    return JSONResponse({})

@contextlib.asynccontextmanager
async def lifespan(app):
    yield
    models = sorted({body["model"] for body in fake.bodies})
    record.write_text(json.dumps({"started": started, "stopped": time.time(), "models": models}))

fake = FakeServer(first_token_delay=0.01, token_gap=0.005)
fake.app.router.routes.append(Route("/health", health, methods=["GET"]))
fake.app.router.lifespan_context = lifespan

async def strict(request):
    body = await request.json()
    unexpected = set(body) & {"min_tokens", "ignore_eos", "repeat_penalty"}
    if unexpected:
        return JSONResponse({"detail": f"Unexpected fields in the request: {unexpected}"}, status_code=422)
    fake.bodies.append(body)
    no_eos = json.loads(body.get("generation_config") or "{}").get("eos_token_id") == -1
    n = body["max_tokens"] if no_eos else min(3, body["max_tokens"])
    usage = body.get("stream_options", {}).get("include_usage")
    return StreamingResponse(fake.events(n, usage), media_type="text/event-stream")

if sys.argv[3:] == ["strict"]:
    fake.app.router.routes.insert(0, Route("/v1/completions", strict, methods=["POST"]))
uvicorn.run(fake.app, host="127.0.0.1", port=port, log_level="warning")
"""

# Like ../shared/peers/start_vllm_cpu.sh: `SCRIPT PORT THREADS`, reads $PEERS; but the server runs as a
# child of the script (not exec'd), so only stopping the whole process group stops it.
FAKE_VLLM_START = """#!/bin/bash
printf '%s\\n' "$@" > "$PEERS/vllm.argv"
"{python}" "{fake_peer}" "$1" "$PEERS/vllm.record" &
echo $! > "$PEERS/vllm.child"
wait
"""

FAKE_TRANSFORMERS = """#!{python}
import json, os, subprocess, sys
from pathlib import Path
here = Path(__file__).parent
seen = {{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE")}}}}
(here / "transformers.argv").write_text(json.dumps(seen))
port = sys.argv[sys.argv.index("--port") + 1]
os.execv(sys.executable, [sys.executable, "{fake_peer}", port, str(here / "transformers.record"), "strict"])
"""

DEAD_TRANSFORMERS = """#!{python}
import sys
print("Loading the model", flush=True)
print("ImportError: continuous batching needs accelerate (pip install accelerate)", file=sys.stderr)
raise SystemExit(3)
"""


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def dist_info(venv: Path, name: str, version: str) -> None:
    """pip's record of an installed distribution, as a venv holds it."""
    folder = venv / "lib" / "python3.11" / "site-packages" / f"{name.replace('-', '_')}-{version}.dist-info"
    folder.mkdir(parents=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def small_run(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--peers",
        "llama-server",  # no --llama-server: skipped; the new peers are added because their paths are given
        "--threads",
        "3",
        "--repeats",
        "1",
        "--concurrency",
        "1",
        "2",
        "--c1-requests",
        "1",
        "--cn-requests",
        "2",
        "--prompt-tokens",
        "4",
        "--output-tokens",
        "5",
        "--ready-timeout",
        "60",
        "--vllm-ready-timeout",
        "60",
        "--json",
        str(out),
        *extra,
    ]


@pytest.fixture
def quiet(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(run_peers, "machine_load", lambda sample_s=1.0: {"loadavg_1m": 0.0, "cpu_busy": 0.0, "cores": 2})
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the fakes import tests.support.fake_server


def test_vllm_and_transformers_serve_are_started_one_at_a_time_swept_and_stopped(tmp_path, quiet, capsys) -> None:  # type: ignore[no-untyped-def]
    fake_peer = tmp_path / "fake_peer.py"
    fake_peer.write_text(FAKE_PEER)
    peers = tmp_path / "peers"
    script = executable(tmp_path / "start_vllm_cpu.sh", FAKE_VLLM_START.format(python=sys.executable, fake_peer=fake_peer))
    dist_info(peers / "vllm-venv", "vllm-cpu", "0.32.0")
    dist_info(peers / "vllm-venv", "torch", "2.13.0+cpu")
    cli = executable(
        peers / "tf-venv" / "bin" / "transformers", FAKE_TRANSFORMERS.format(python=sys.executable, fake_peer=fake_peer)
    )
    dist_info(peers / "tf-venv", "transformers", "5.25.0")
    dist_info(peers / "tf-venv", "accelerate", "1.15.0")
    hf_dir = peers / "smollm2-hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    out = tmp_path / "results.json"
    argv = small_run(model, out, "--peers-dir", str(peers), "--vllm-start", str(script), "--transformers-serve", str(cli))
    try:
        assert run_peers.main(argv) == 0
    finally:  # never leave the fake's child running, whatever went wrong
        child = peers / "vllm.child"
        if child.exists():
            try:
                os.kill(int(child.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    printed = capsys.readouterr().out
    assert "vllm ready after" in printed and "transformers-serve ready after" in printed
    assert "SKIP llama-server" in printed
    results = json.loads(out.read_text())

    # vLLM: `SCRIPT PORT THREADS`, one core left to its API and engine-core processes, PEERS = --peers-dir.
    port, threads = (peers / "vllm.argv").read_text().split()
    assert int(port) > 0 and threads == "2"
    assert results["vllm"]["version"] == "0.32.0" and results["vllm"]["versions"]["torch"] == "2.13.0+cpu"
    assert results["vllm"]["worker_threads"] == 2
    # The server was the script's child: it stopped (SIGTERM, so it wrote its record) with the group.
    vllm_record = json.loads((peers / "vllm.record").read_text())
    assert vllm_record["models"] == ["fake-model"]  # the first model /v1/models lists

    # transformers serve: the HF folder, on loopback, CPU, continuous batching, --threads, offline.
    seen = json.loads((peers / "tf-venv" / "bin" / "transformers.argv").read_text())
    args = seen["argv"]
    assert args[:2] == ["serve", str(hf_dir)] and "--continuous-batching" in args
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--device") + 1] == "cpu"
    assert seen["env"] == {"OMP_NUM_THREADS": "3", "HF_HUB_OFFLINE": "1"}
    tf_record = json.loads((peers / "tf-venv" / "bin" / "transformers.record").read_text())
    assert tf_record["models"] == [str(hf_dir)]  # it expects the folder path as the model id
    assert results["transformers-serve"]["version"] == "5.25.0"
    assert results["transformers-serve"]["versions"]["accelerate"] == "1.15.0"
    # Its bodies were translated: no 422s, and the full output length with EOS turned off.
    for key in ("c1", "c2"):
        median = results["transformers-serve"][key]["median"]
        assert (median["errors"], median["short_outputs"]) == (0, 0)

    # One at a time: vLLM was stopped before transformers serve started.
    assert vllm_record["stopped"] <= tf_record["started"]
    # The sweep: both workloads on both peers, medians per concurrency.
    for peer in ("vllm", "transformers-serve"):
        assert set(k for k in results[peer] if k.startswith("c")) == {"c1", "c2"}
        point = results["sweep"][peer]["2"]
        assert point["output_tok_s"] > 0 and point["ttft_p50_ms"] > 0 and point["errors"] == 0
        assert results[peer]["c2"]["runs"][0]["workload"]["concurrency"] == 2
    assert results["settings"]["concurrency"] == [1, 2]
    assert "concurrency sweep" in printed and "transformers-serve" in printed.split("concurrency sweep")[1]


def test_a_peer_that_dies_at_start_is_reported_with_its_log(tmp_path, quiet, capsys) -> None:  # type: ignore[no-untyped-def]
    peers = tmp_path / "peers"
    cli = executable(peers / "tf-venv" / "bin" / "transformers", DEAD_TRANSFORMERS.format(python=sys.executable))
    (peers / "smollm2-hf").mkdir()
    (peers / "smollm2-hf" / "config.json").write_text("{}")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    out = tmp_path / "results.json"
    started = time.monotonic()
    assert run_peers.main(small_run(model, out, "--peers-dir", str(peers), "--transformers-serve", str(cli))) == 0
    assert time.monotonic() - started < 30  # noticed at once, not after --ready-timeout
    err = capsys.readouterr().err
    assert "ERROR transformers-serve: server exited with 3; log tail:" in err
    assert "continuous batching needs accelerate" in err
    assert json.loads(out.read_text())["transformers-serve"] is None


def test_new_peers_are_skipped_with_a_reason(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    not_executable = tmp_path / "start.sh"
    not_executable.write_text("#!/bin/sh\n")
    base = ["--model", str(model), "--peers", "vllm", "transformers-serve", "--peers-dir", str(tmp_path)]
    assert run_peers.main(base) == 0
    printed = capsys.readouterr().out
    assert "SKIP vllm: pass --vllm-start SCRIPT" in printed and "SKIP transformers-serve: pass --transformers-serve" in printed
    cli = executable(tmp_path / "bin" / "transformers", "#!/bin/sh\n")
    assert run_peers.main([*base, "--vllm-start", str(not_executable), "--transformers-serve", str(cli)]) == 0
    printed = capsys.readouterr().out
    assert f"SKIP vllm: {not_executable} is not an executable file" in printed
    assert f"SKIP transformers-serve: no HF model at {tmp_path / 'smollm2-hf'}" in printed


def test_concurrency_sweep_workloads_and_llama_server_slots() -> None:
    parser = run_peers.build_parser()
    default = parser.parse_args([])
    assert default.concurrency == [32] and list(run_peers.workloads(default)) == ["c1", "c32"]
    args = parser.parse_args(["--concurrency", "32", "8", "1", "--c1-requests", "4", "--cn-requests", "64"])
    loads = run_peers.workloads(args)
    assert list(loads) == ["c1", "c8", "c32"]
    assert [(w.concurrency, w.num_requests) for w in loads.values()] == [(1, 4), (8, 64), (32, 64)]
    assert max(run_peers.concurrencies(args)) == 32


def test_every_workload_and_repetition_sends_prompts_no_other_one_sent() -> None:
    """A server with a prefix cache (ours, llama-server, vLLM) keeps the prompts of the runs before: a
    repetition that resent them (c8 #1 and c32 #1 once drew the same seed) would time cache hits, not prefill."""
    from bench import loadgen

    args = run_peers.build_parser().parse_args(["--concurrency", "8", "32", "--cn-requests", "32", "--repeats", "3"])
    openings: dict[str, tuple[str, int]] = {}
    for key, workload in run_peers.workloads(args).items():
        for rep in range(args.repeats):
            for spec in loadgen.make_specs(run_peers.repetition(workload, rep)):
                opening = " ".join(spec.prompt.split()[:6])
                assert openings.setdefault(opening, (key, rep)) == (key, rep), f"{key} #{rep + 1} resends a prompt"
    assert len(openings) == 4 * 3 + 32 * 3 + 32 * 3


def _server(points: dict[int, tuple[float, float, float]]) -> dict:  # type: ignore[type-arg]
    """A peer's results: {concurrency: (output tok/s, TTFT p50 ms, decode tok/s p50)}."""
    return {
        f"c{n}": {
            "median": {
                "output_tok_s": tok_s,
                "ttft_p50_ms": ttft,
                "decode_tok_s_p50": decode,
                "errors": 0,
                "short_outputs": 0,
            }
        }
        for n, (tok_s, ttft, decode) in points.items()
    }


def test_issue17_targets() -> None:
    args = run_peers.build_parser().parse_args(["--concurrency", "1", "8", "32"])
    results = {
        "ours": _server({1: (60.0, 20.0, 60.0), 8: (300.0, 40.0, 40.0), 32: (600.0, 90.0, 20.0)}),
        "llama-server": _server({1: (70.0, 10.0, 70.0), 8: (100.0, 50.0, 14.0), 32: (250.0, 200.0, 8.0)}),
        "vllm": _server({1: (30.0, 30.0, 30.0), 8: (200.0, 60.0, 25.0), 32: (500.0, 150.0, 16.0)}),
    }
    rows = {row["comparison"]: row for row in run_peers.compare(results, args)}
    decode = rows["issue 17: one-stream decode tok/s, c1: ours / llama.cpp llama-server"]
    assert decode["ratio"] == pytest.approx(60 / 70) and decode["target"] == ">= 1x" and decode["pass"] is False
    c8_vllm = rows["issue 17: aggregate output tok/s, c8: ours / vLLM (vllm-cpu)"]
    assert c8_vllm["ratio"] == pytest.approx(1.5) and c8_vllm["pass"] is True
    c32_vllm = rows["issue 17: aggregate output tok/s, c32: ours / vLLM (vllm-cpu)"]
    assert c32_vllm["ratio"] == pytest.approx(1.2) and c32_vllm["pass"] is False
    c8_llama = rows["issue 17: aggregate output tok/s, c8: ours / llama.cpp llama-server"]
    assert c8_llama["ratio"] == pytest.approx(3.0) and c8_llama["target"] == ">= 2.5x" and c8_llama["pass"] is True
    assert rows["issue 17: aggregate output tok/s, c32: ours / llama.cpp llama-server"]["pass"] is False  # 2.4x
    ttft = rows["issue 17: TTFT p50 ms, c32: ours / llama.cpp llama-server"]
    assert ttft["ratio"] == pytest.approx(0.45) and ttft["target"] == "<= 0.5x" and ttft["pass"] is True
    # Issue 6's rows stay, at the largest concurrency.
    assert rows["aggregate output tok/s, c32: ours / llama.cpp llama-server"]["target"] == ">= 2x"
    text = run_peers.format_comparison(list(rows.values()))
    assert "ratio 1.20 target >= 1.3x FAIL" in text and "ratio 0.45 target <= 0.5x PASS" in text

    # A peer's errors make its row fail, and say why.
    results["vllm"]["c8"]["median"]["errors"] = 2
    rows = {row["comparison"]: row for row in run_peers.compare(results, args)}
    broken = rows["issue 17: aggregate output tok/s, c8: ours / vLLM (vllm-cpu)"]
    assert broken["pass"] is False and broken["problems"] == ["vllm c8: 2 errors"]
    # Only what both measured is compared: here vLLM alone, at 32 streams (and no llama-server rows).
    args = run_peers.build_parser().parse_args(["--concurrency", "32"])
    only_c32 = {peer: {k: v for k, v in results[peer].items() if k != "c8"} for peer in ("ours", "vllm")}
    rows = {row["comparison"]: row for row in run_peers.compare(only_c32, args)}
    assert list(rows) == ["issue 17: aggregate output tok/s, c32: ours / vLLM (vllm-cpu)"]


def test_sweep_lists_server_peers_by_concurrency() -> None:
    results = {
        "transformers": {"batches": {"1": {"median": {"decode_tok_s": 30.0}}}},
        "ours": _server({32: (600.0, 90.0, 20.0), 1: (60.0, 20.0, 60.0), 8: (300.0, 40.0, 40.0)}),
        "llama.cpp": None,
    }
    table = run_peers.sweep(results)
    assert list(table) == ["ours"]  # generate's batches are no concurrency sweep; a failed peer is None
    assert list(table["ours"]) == ["1", "8", "32"]
    assert table["ours"]["8"]["output_tok_s"] == 300.0 and table["ours"]["32"]["ttft_p50_ms"] == 90.0
    assert "ours" in run_peers.format_sweep(table) and "600.0 / 90" in run_peers.format_sweep(table)


def test_transformers_serve_bodies_are_translated_only_while_it_is_measured() -> None:
    spec = run_peers.loadgen.RequestSpec("the of and", 3, 7)
    body = run_peers.loadgen.request_body(spec, "m", run_peers.Workload(num_requests=1, concurrency=1))
    assert {"min_tokens", "ignore_eos", "repeat_penalty"} <= set(body)
    translated = run_peers.transformers_serve_body(body)
    assert not {"min_tokens", "ignore_eos", "repeat_penalty"} & set(translated)
    assert json.loads(translated["generation_config"]) == {"eos_token_id": -1} and translated["max_tokens"] == 7
    assert "min_tokens" in body  # the original is left alone
    keeps_eos = run_peers.Workload(num_requests=1, concurrency=1, ignore_eos=False)
    assert "generation_config" not in run_peers.transformers_serve_body(run_peers.loadgen.request_body(spec, "m", keeps_eos))

    original = run_peers.loadgen.request_body
    with run_peers.adapted_bodies(run_peers.transformers_serve_body):
        assert "generation_config" in run_peers.loadgen.request_body(spec, "m", run_peers.Workload(1, 1))
    assert run_peers.loadgen.request_body is original
    with run_peers.adapted_bodies(None):
        assert run_peers.loadgen.request_body is original
