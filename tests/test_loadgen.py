"""The load generator against a fake SSE server whose timings and failures are known in advance."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from bench import loadgen, run_peers
from bench.loadgen import Workload
from tests.support.fake_server import FIRST_TOKEN_DELAY, TOKEN_GAP, FakeServer


@pytest.fixture
def serve() -> Iterator:  # type: ignore[type-arg]
    """serve(x) -> base URL of x.app; uvicorn runs in a thread on a free port and stops after the test."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(fake: FakeServer | SimpleNamespace) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="auto"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=5)


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 100):
        values = rng.exponential(size=size).tolist()
        assert loadgen.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert loadgen.percentile([], 50) is None


def test_parse_range() -> None:
    assert loadgen.parse_range("128") == (128, 128)
    assert loadgen.parse_range("64-256") == (64, 256)
    with pytest.raises(Exception, match="LOW-HIGH"):
        loadgen.parse_range("a-b")
    with pytest.raises(ValueError, match="output_tokens"):
        Workload(num_requests=1, concurrency=1, output_tokens=(9, 3))


def test_workload_is_reproducible_plain_words() -> None:
    w = Workload(num_requests=20, concurrency=2, prompt_tokens=(5, 9), output_tokens=(2, 4), seed=3)
    specs = loadgen.make_specs(w)
    assert specs == loadgen.make_specs(w)
    assert len({s.prompt for s in specs}) == 20  # fresh prompts: no shared prefix cache hits
    for spec in specs:
        words = spec.prompt.split(" ")
        assert len(words) == spec.prompt_words and 5 <= len(words) <= 9
        assert set(words) <= set(loadgen.WORDS)
        assert 2 <= spec.max_tokens <= 4


def test_report_against_fake_server(serve) -> None:  # type: ignore[no-untyped-def]
    fake = FakeServer(fail_every=5)
    url = serve(fake)
    w = Workload(num_requests=10, concurrency=3, prompt_tokens=(4, 6), output_tokens=(5, 5))
    report = asyncio.run(loadgen.measure(url, w, warmup=0))

    assert (report["requests"], report["completed"], report["errors"]) == (10, 8, 2)
    assert "HTTP 503" in report["error_samples"][0]
    assert report["token_source"] == ["usage"] and report["short_outputs"] == 0
    assert report["output_tokens"] == 8 * 5 and report["prompt_tokens"] == 8 * 7
    assert report["output_tok_s"] == pytest.approx(40 / report["duration_s"])
    assert FIRST_TOKEN_DELAY <= report["ttft_ms"]["p50"] / 1000 < FIRST_TOKEN_DELAY + 0.5
    assert report["itl_ms"]["n"] == 8 * 4
    assert TOKEN_GAP <= report["itl_ms"]["p50"] / 1000 < TOKEN_GAP + 0.2
    e2e_floor = FIRST_TOKEN_DELAY + 4 * TOKEN_GAP
    assert report["e2e_s"]["p50"] >= e2e_floor
    assert report["tpot_ms"]["p50"] / 1000 >= TOKEN_GAP
    # 10 requests over 3 clients: at least 4 rounds of one request each.
    assert report["duration_s"] >= 3 * FIRST_TOKEN_DELAY
    for body in fake.bodies:
        assert body["model"] == "fake-model" and body["stream"] is True
        assert body["min_tokens"] == body["max_tokens"] == 5 and body["ignore_eos"] is True


def test_counts_chunks_without_usage_and_flags_short_outputs(serve) -> None:  # type: ignore[no-untyped-def]
    url = serve(FakeServer(send_usage=False))
    w = Workload(num_requests=4, concurrency=2, output_tokens=(6, 6), prompt_tokens=(3, 3), ignore_eos=False)
    report = asyncio.run(loadgen.measure(url, w, warmup=0))
    assert report["completed"] == 4 and report["token_source"] == ["chunks"]
    assert report["output_tokens"] == 4 * 3 and report["short_outputs"] == 4


def test_error_event_mid_stream_is_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    url = serve(FakeServer(break_stream=True))
    w = Workload(num_requests=2, concurrency=2, output_tokens=(5, 5), prompt_tokens=(3, 3))
    report = asyncio.run(loadgen.measure(url, w, warmup=0))
    assert report["errors"] == 2 and report["error_samples"] == ["engine died"]
    assert report["ttft_ms"]["n"] == 0 and report["ttft_ms"]["p50"] is None
    assert "-" in loadgen.format_report(report)


def test_cut_off_stream_is_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    url = serve(FakeServer(cut_at=2))
    w = Workload(num_requests=1, concurrency=1, output_tokens=(5, 5), prompt_tokens=(3, 3))
    report = asyncio.run(loadgen.measure(url, w, warmup=0))
    assert report["errors"] == 1 and "cut off" in report["error_samples"][0]


def test_cli_writes_json_and_fails_cleanly(serve, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    url = serve(FakeServer())
    out = tmp_path / "report.json"
    argv = [
        "--base-url",
        url,
        "-c",
        "2",
        "-n",
        "3",
        "--prompt-tokens",
        "3-5",
        "--output-tokens",
        "4",
        "--warmup",
        "1",
        "--label",
        "fake",
        "--json",
        str(out),
    ]
    assert loadgen.main(argv) == 0
    table = capsys.readouterr().out
    assert "== fake" in table and "TTFT (ms)" in table
    saved = json.loads(out.read_text())
    assert saved["completed"] == 3 and saved["output_tokens"] == 12

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert loadgen.main(["--base-url", dead, "-n", "1"]) == 2
    assert "loadgen:" in capsys.readouterr().err


def test_run_peers_compares_two_servers(serve, tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """A fast fake against a slow fake through the runner: medians, ratios and verdicts."""
    monkeypatch.setattr(run_peers, "machine_load", lambda sample_s=1.0: {"loadavg_1m": 1.5, "cpu_busy": 0.9, "cores": 2})
    fast = serve(FakeServer(first_token_delay=0.01, token_gap=0.002))
    slow = serve(FakeServer(first_token_delay=0.05, token_gap=0.02))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    out = tmp_path / "results.json"
    argv = [
        "--model",
        str(model),
        "--peers",
        "ours",
        "llama.cpp",
        "--ours-url",
        fast,
        "--llamacpp-url",
        slow,
        "--repeats",
        "2",
        "--concurrency",
        "3",
        "--c1-requests",
        "2",
        "--cn-requests",
        "6",
        "--prompt-tokens",
        "4",
        "--output-tokens",
        "6",
        "--json",
        str(out),
    ]
    assert run_peers.main(argv) == 0
    captured = capsys.readouterr()
    assert "WARNING before ours c1 #1: CPU 90% busy" in captured.err
    assert "WARNING: load average 1.50 before the run" in captured.err

    results = json.loads(out.read_text())
    assert len(results["ours"]["c3"]["runs"]) == 2
    runs = [r["output_tok_s"] for r in results["ours"]["c3"]["runs"]]
    assert results["ours"]["c3"]["median"]["output_tok_s"] == pytest.approx(np.median(runs))
    rows = {row["comparison"].split(":")[0]: row for row in results["comparison"]}
    throughput = rows["aggregate output tok/s, c3"]
    assert throughput["ratio"] == pytest.approx(throughput["ours"] / throughput["peer"])
    # 20 ms vs 2 ms per token: the fast fake produces well over twice the tokens per second.
    assert throughput["ratio"] > 2 and throughput["pass"] is True
    ttft = rows["TTFT p50 ms, c3"]
    assert ttft["ours"] < ttft["peer"] and ttft["pass"] is True
    assert "PASS" in captured.out and "FAIL" not in captured.out


def test_run_peers_skips_llamacpp_without_python(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    missing = tmp_path / "no-venv" / "python"
    assert run_peers.main(["--model", str(model), "--peers", "llama.cpp", "--llamacpp-python", str(missing)]) == 0
    assert f"SKIP llama.cpp: {missing} does not exist" in capsys.readouterr().out
    assert run_peers.main(["--model", str(tmp_path / "absent.gguf")]) == 2


def test_a_dead_server_is_reported_with_its_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('segfault in mul_mat'); raise SystemExit(3)"], stdout=out)
    proc.wait()
    with pytest.raises(RuntimeError, match=r"(?s)died \(exit code 3\).*segfault in mul_mat"):
        run_peers.Served("peer", "http://127.0.0.1:1", proc, log).check_alive()
    run_peers.Served("peer", "http://127.0.0.1:1").check_alive()  # not ours to watch: no error


def test_hf_generate_timings_on_a_tiny_transformers_model() -> None:
    """The baseline counts exactly the asked-for tokens, even when EOS would come first."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench import hf_generate

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # all logits 0: greedy picks id 0 = EOS, so plain generate stops at once
        model.model.norm.weight.zero_()
    ids = torch.randint(1, 64, (1, 5))
    assert model.generate(ids, max_new_tokens=6, do_sample=False).shape[1] == 6
    stream = hf_generate.measure_stream(model, ids, 6)
    assert stream["ttft_s"] > 0 and stream["decode_tok_s"] > 0 and stream["e2e_s"] >= stream["ttft_s"]
    batch = hf_generate.measure_batch(model, torch.randint(1, 64, (3, 5)), 4)
    assert batch["output_tokens"] == 12
    assert batch["output_tok_s"] == pytest.approx(12 / batch["seconds"])


def test_our_server_honours_lengths_under_load(serve) -> None:  # type: ignore[no-untyped-def]
    """The real app on a tiny random model: every request gets exactly max_tokens (ignore_eos and
    min_tokens honoured), usage is reported, and nothing fails with 3 concurrent streams."""
    from app.config import Settings
    from app.server import create_app
    from model.checkpoint import LoadedModel
    from model.tokenizer import ByteTokenizer
    from tests.support.models import tiny_model

    model = tiny_model(max_batch_size=2, max_seq_len=128)
    loaded = LoadedModel(model=model, tokenizer=ByteTokenizer(), args=model.args, name="tiny", chat_template=None)
    app = create_app(Settings(max_batch_size=2, max_seq_len=128, warmup=False, compile=False, log_level="warning"), loaded)
    url = serve(SimpleNamespace(app=app))
    deadline = time.monotonic() + 20  # the engine starts in the background after uvicorn is up
    while httpx.get(url + "/v1/models").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    w = Workload(num_requests=6, concurrency=3, prompt_tokens=(2, 6), output_tokens=(5, 9), seed=1)
    report = asyncio.run(loadgen.measure(url, w, warmup=1))

    specs = loadgen.make_specs(w)
    assert (report["completed"], report["errors"], report["short_outputs"]) == (6, 0, 0)
    assert report["token_source"] == ["usage"]
    assert report["output_tokens"] == sum(s.max_tokens for s in specs)
    assert report["prompt_tokens"] >= sum(len(s.prompt.encode()) for s in specs)  # one byte per token
    assert report["ttft_ms"]["n"] == 6 and report["output_tok_s"] > 0


def test_check_quiet_waits_for_the_cpu_then_warns_only_if_still_busy(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    samples = iter([0.9, 0.8, 0.05])
    monkeypatch.setattr(
        run_peers, "machine_load", lambda sample_s=1.0: {"loadavg_1m": 1.0, "cpu_busy": next(samples), "cores": 2}
    )
    assert run_peers.check_quiet("x", max_busy=0.15, wait_s=60)["cpu_busy"] == 0.05
    assert "WARNING" not in capsys.readouterr().err
    monkeypatch.setattr(run_peers, "machine_load", lambda sample_s=1.0: {"loadavg_1m": 1.0, "cpu_busy": 0.5, "cores": 2})
    run_peers.check_quiet("y", max_busy=0.15, wait_s=0)
    assert "WARNING before y: CPU 50% busy" in capsys.readouterr().err
    monkeypatch.undo()
    busy = run_peers.machine_load(0.05)["cpu_busy"]  # the real /proc/stat sampler
    assert busy is not None and 0.0 <= busy <= 1.0


def test_a_target_is_not_passed_on_a_run_with_errors() -> None:
    def server(errors: int, short: int, tok_s: float) -> dict:  # type: ignore[type-arg]
        median = {"output_tok_s": tok_s, "ttft_p50_ms": 10.0, "decode_tok_s_p50": 50.0, "errors": errors, "short_outputs": short}
        return {"c1": {"median": median}, "c4": {"median": median}}

    args = run_peers.build_parser().parse_args(["--concurrency", "4"])
    rows = run_peers.compare({"ours": server(2, 0, 300.0), "llama.cpp": server(0, 1, 100.0)}, args)
    throughput = next(r for r in rows if r["comparison"].startswith("aggregate"))
    assert throughput["ratio"] == pytest.approx(3.0) and throughput["pass"] is False
    assert throughput["problems"] == ["ours c4: 2 errors", "llama.cpp c4: 1 short outputs"]
    assert "not comparable: ours c4: 2 errors" in run_peers.format_comparison(rows)
    clean = run_peers.compare({"ours": server(0, 0, 300.0), "llama.cpp": server(0, 0, 100.0)}, args)
    assert next(r for r in clean if r["comparison"].startswith("aggregate"))["pass"] is True
