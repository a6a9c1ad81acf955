"""The native llama.cpp peer of bench/run_peers.py, against a fake `llama-server` executable."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from bench import run_peers
from tests.support import REPO

# Answers `--version` like llama-server (on stderr); otherwise writes its argv next to itself and serves the
# fake SSE server of tests/support/fake_server.py, with a /health that says 503 for the first half second ("loading").
FAKE_LLAMA_SERVER = """#!{python}
import sys, time
if sys.argv[1:] == ["--version"]:
    print("version: 0.5.0-dev (build 42, commit abc1234)", file=sys.stderr)
    print("built with GNU 12.2.0 for Linux x86_64", file=sys.stderr)
    raise SystemExit(0)
import json
from pathlib import Path
import uvicorn
from starlette.responses import JSONResponse
from starlette.routing import Route
from tests.support.fake_server import FakeServer

Path(__file__).with_suffix(".argv").write_text(json.dumps(sys.argv[1:]))
started = time.monotonic()

async def health(request):
    if time.monotonic() - started < 0.5:
        return JSONResponse({{"error": {{"code": 503, "message": "Loading model"}}}}, status_code=503)
    return JSONResponse({{"status": "ok"}})

fake = FakeServer(first_token_delay=0.01, token_gap=0.005)
fake.app.router.routes.append(Route("/health", health, methods=["GET"]))
uvicorn.run(fake.app, host="127.0.0.1", port=int(sys.argv[sys.argv.index("--port") + 1]), log_level="warning")
"""


def fake_binary(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_llama_server_is_started_with_one_slot_per_client_and_compared(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(run_peers, "machine_load", lambda sample_s=1.0: {"loadavg_1m": 0.0, "cpu_busy": 0.0, "cores": 2})
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the fake imports tests.support.fake_server
    binary = fake_binary(tmp_path / "llama-server", FAKE_LLAMA_SERVER.format(python=sys.executable))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    out = tmp_path / "results.json"
    argv = [
        "--model",
        str(model),
        "--peers",
        "llama-server",
        "--llama-server",
        str(binary),
        "--threads",
        "3",
        "--repeats",
        "1",
        "--concurrency",
        "3",
        "--c1-requests",
        "1",
        "--cn-requests",
        "3",
        "--prompt-tokens",
        "4",
        "--output-tokens",
        "5",
        "--max-seq-len",
        "256",
        "--ready-timeout",
        "60",
        "--json",
        str(out),
    ]
    assert run_peers.main(argv) == 0
    assert "llama-server ready after" in capsys.readouterr().out

    args = json.loads(binary.with_suffix(".argv").read_text())
    assert args[args.index("-np") + 1] == "3" and args[args.index("-c") + 1] == str(3 * 256)
    assert args[args.index("-t") + 1] == args[args.index("-tb") + 1] == "3"
    assert args[args.index("-m") + 1] == str(model) and args[args.index("--host") + 1] == "127.0.0.1"
    results = json.loads(out.read_text())
    assert results["llama-server"]["version"] == "0.5.0-dev (build 42, commit abc1234)"
    median = results["llama-server"]["c3"]["median"]
    assert (median["errors"], median["short_outputs"]) == (0, 0)


def test_llama_server_is_skipped_when_the_binary_cannot_run(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    missing = tmp_path / "build" / "bin" / "llama-server"
    assert run_peers.main(["--model", str(model), "--peers", "llama-server", "--llama-server", str(missing)]) == 0
    assert f"SKIP llama-server: {missing} does not exist" in capsys.readouterr().out
    broken = fake_binary(tmp_path / "broken", f"#!{sys.executable}\nraise SystemExit('no libggml')\n")
    assert run_peers.main(["--model", str(model), "--peers", "llama-server", "--llama-server", str(broken)]) == 0
    assert "SKIP llama-server:" in capsys.readouterr().out
    assert run_peers.main(["--model", str(model), "--peers", "llama-server"]) == 0
    assert "SKIP llama-server: pass --llama-server PATH" in capsys.readouterr().out


def test_both_llama_cpp_servers_get_the_targets() -> None:
    def server(tok_s: float, ttft_ms: float) -> dict:  # type: ignore[type-arg]
        median = {"output_tok_s": tok_s, "ttft_p50_ms": ttft_ms, "decode_tok_s_p50": 50.0, "errors": 0, "short_outputs": 0}
        return {"c1": {"median": median}, "c4": {"median": median}}

    args = run_peers.build_parser().parse_args(["--concurrency", "4"])
    results = {"ours": server(300.0, 10.0), "llama.cpp": server(100.0, 50.0), "llama-server": server(200.0, 5.0)}
    rows = {row["comparison"]: row for row in run_peers.compare(results, args)}
    python_peer = rows["aggregate output tok/s, c4: ours / llama-cpp-python server"]
    native = rows["aggregate output tok/s, c4: ours / llama.cpp llama-server"]
    assert python_peer["pass"] is True and python_peer["ratio"] == pytest.approx(3.0)
    assert native["pass"] is False and native["ratio"] == pytest.approx(1.5)
    assert rows["TTFT p50 ms, c4: ours / llama.cpp llama-server"]["pass"] is False
    assert rows["TTFT p50 ms, c4: ours / llama-cpp-python server"]["pass"] is True
    assert rows["batch-1 streaming decode tok/s: ours / llama.cpp llama-server"]["target"] is None
    assert "ratio 1.50 target >= 2x FAIL" in run_peers.format_comparison(list(rows.values()))


def test_default_peers_include_the_native_server() -> None:
    args = run_peers.build_parser().parse_args([])
    assert args.peers == ["transformers", "ours", "llama.cpp", "llama-server"]
    assert args.llama_server is None and args.llama_server_url is None
