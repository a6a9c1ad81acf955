"""Prefix-cache benchmark (issue 13): time to first token per chat turn with the cache on and off, against
llama.cpp's `llama-server` (cache_prompt, on by default) and vLLM's CPU build (automatic prefix caching,
on by default), one server after another in one run.

Two workloads, both streamed chat completions at temperature 0:
- multi-turn: `--conversations` chats run side by side, each `--turns` turns long, each opening with the
  same ~500-token instructions; every turn resends the history (the model's own answers included) plus
  a new question, as chat clients do, `--think-time` seconds after the answer (0: at once);
- shared system prompt: `--shared-requests` independent requests with one ~500-token system prompt and
  their own question, `--shared-concurrency` at a time.
Prints TTFT p50/p90 per turn for each server, the ratios issue 13 targets, and writes --json.

    python -m bench.prefix_cache --llama-server ~/peers/llama-build/bin/llama-server \\
        --vllm-start /work/shared/peers/start_vllm_cpu.sh --peers-dir ~/peers --json bench-prefix.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.run_peers import Served, check_quiet, free_port, llama_server_version, server, vllm_env
from model.fetch import default_cache_dir

TOPICS = ["rivers", "bridges", "volcanoes", "libraries", "trains", "gardens", "clocks", "islands", "bees", "maps"]
INSTRUCTIONS = (
    "You are a careful assistant for a team of engineers. Answer in plain words, keep every answer short, "
    "say when you are unsure, never invent numbers, and prefer examples from everyday life. "
)  # 10 times: about 500 tokens with SmolLM2's tokenizer


def question(conversation: int, turn: int) -> str:
    topic = TOPICS[(conversation + turn) % len(TOPICS)]
    return f"Conversation {conversation}, question {turn + 1}: tell me one surprising fact about {topic}."


# A fresh connection per request: llama-server's HTTP library closes a keep-alive connection after a few
# requests, and a request sent on it just then fails ("Server disconnected without sending a response").
NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def chat_ttft(client: httpx.AsyncClient, model: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, str]:
    """Seconds to the first streamed content, and the whole answer text."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start, first, text = time.perf_counter(), None, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            piece = (choices[0].get("delta") or {}).get("content") or ""
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
    return (first if first is not None else time.perf_counter() - start), "".join(text)


async def multi_turn(url: str, model: str, args: argparse.Namespace) -> list[list[float]]:
    """TTFT of every turn of every conversation: result[turn] = one value per conversation."""
    per_turn: list[list[float]] = [[] for _ in range(args.turns)]
    system = INSTRUCTIONS * args.system_repeat
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=NO_KEEPALIVE) as client:

        async def talk(c: int) -> None:
            messages = [{"role": "system", "content": f"{system}This is conversation {c}."}]  # an agent's long instructions
            for turn in range(args.turns):
                if turn and args.think_time:
                    await asyncio.sleep(args.think_time)  # the user reads the answer before replying
                messages.append({"role": "user", "content": question(c, turn)})
                ttft, answer = await chat_ttft(client, model, messages, args.max_tokens)
                per_turn[turn].append(ttft)
                messages.append({"role": "assistant", "content": answer})

        await asyncio.gather(*(talk(c) for c in range(args.conversations)))
    return per_turn


async def shared_system(url: str, model: str, args: argparse.Namespace) -> list[float]:
    """TTFT of each request after the first wave (which fills the cache)."""
    gate = asyncio.Semaphore(args.shared_concurrency)
    system = INSTRUCTIONS * args.system_repeat
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=NO_KEEPALIVE) as client:
        first = [{"role": "system", "content": system}, {"role": "user", "content": question(999, 0)}]
        await chat_ttft(client, model, first, args.max_tokens)  # the system prompt is now computed once

        async def one(i: int) -> float:
            async with gate:
                messages = [{"role": "system", "content": system}, {"role": "user", "content": question(i, i)}]
                return (await chat_ttft(client, model, messages, args.max_tokens))[0]

        return list(await asyncio.gather(*(one(i) for i in range(args.shared_requests))))


def measure(served: Served, args: argparse.Namespace) -> dict[str, Any]:
    check_quiet(served.name, args.max_busy, wait_s=30)
    model = served.model or httpx.get(served.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    turns = asyncio.run(multi_turn(served.url, model, args))
    shared = asyncio.run(shared_system(served.url, model, args))
    served.check_alive()
    return {
        "turn_ttft_p50": [percentile(t, 0.5) for t in turns],
        "turn_ttft_p90": [percentile(t, 0.9) for t in turns],
        "shared_ttft_p50": percentile(shared, 0.5),
        "shared_ttft_p90": percentile(shared, 0.9),
    }


def run_ours(args: argparse.Namespace, cache: bool) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "app", "--model", str(args.model), "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(args.threads), "--max-batch-size", str(args.slots), "--max-seq-len", str(args.max_seq_len),
           "--prefix-cache" if cache else "--no-prefix-cache", *args.ours_args.split()]  # fmt: skip
    name = "ours" if cache else "ours-no-cache"
    with server(name, cmd, port, dict(os.environ), args.ready_timeout) as served:
        return measure(served, args)


def run_llama_server(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.llama_server:
        print("SKIP llama-server: pass --llama-server PATH")
        return None
    port = free_port()
    cmd = [args.llama_server, "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
           "-tb", str(args.threads), "-np", str(args.slots), "-c", str(args.slots * args.max_seq_len)]  # fmt: skip
    with server("llama-server", cmd, port, dict(os.environ), args.ready_timeout, ready_path="/health") as served:
        return {**measure(served, args), "version": llama_server_version(args.llama_server)}


def run_vllm(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.vllm_start:
        print("SKIP vllm: pass --vllm-start SCRIPT")
        return None
    port = free_port()
    threads = max(1, args.threads - 1)
    env = vllm_env(args)
    with server("vllm", [str(args.vllm_start), str(port), str(threads)], port, env, args.vllm_ready_timeout, "/health") as served:
        return measure(served, args)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def report(results: dict[str, Any]) -> str:
    lines = ["TTFT p50 / p90 (s) per turn, multi-turn workload"]
    for name, r in results.items():
        if r is None:
            continue
        cells = [f"{p50:.3f}/{p90:.3f}" for p50, p90 in zip(r["turn_ttft_p50"], r["turn_ttft_p90"])]
        lines.append(
            f"  {name:14s} " + "  ".join(cells) + f"   shared system prompt {r['shared_ttft_p50']:.3f}/{r['shared_ttft_p90']:.3f}"
        )
    on, off, llama = results.get("ours"), results.get("ours-no-cache"), results.get("llama-server")
    if on and off:
        lines.append("ratios, turns >= 2 (issue 13: cache on / off <= 0.25; on / llama-server <= 1.0):")
        for turn in range(1, len(on["turn_ttft_p50"])):
            a = on["turn_ttft_p50"][turn]
            lines.append(
                f"  turn {turn + 1}: on/off {ratio(a, off['turn_ttft_p50'][turn])}"
                + (f"  on/llama-server {ratio(a, llama['turn_ttft_p50'][turn])}" if llama else "")
            )
        lines.append(f"  shared system prompt: on/off {ratio(on['shared_ttft_p50'], off['shared_ttft_p50'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=16, help="KV slots (ours) / -np (llama-server)")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--think-time", type=float, default=0.0, help="seconds a user reads an answer before the next turn")
    parser.add_argument("--system-repeat", type=int, default=10, help="times the instructions repeat (10: ~500 tokens)")
    parser.add_argument("--shared-requests", type=int, default=16)
    parser.add_argument("--shared-concurrency", type=int, default=4)
    parser.add_argument("--servers", nargs="+", default=["ours", "ours-no-cache", "llama-server", "vllm"])
    parser.add_argument("--ours-args", default="", help="more llamaserve flags, e.g. --no-batch-invariant (reuses answers too)")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary")
    parser.add_argument("--vllm-start", type=Path, help="../shared/peers/start_vllm_cpu.sh")
    parser.add_argument("--peers-dir", type=Path, default=Path.home() / "peers")
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--vllm-ready-timeout", type=float, default=900)
    parser.add_argument("--max-busy", type=float, default=0.3, help="refuse to measure while the CPUs are busier than this")
    parser.add_argument("--json", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runners = {
        "ours": lambda: run_ours(args, cache=True),
        "ours-no-cache": lambda: run_ours(args, cache=False),
        "llama-server": lambda: run_llama_server(args),
        "vllm": lambda: run_vllm(args),
    }
    results: dict[str, Any] = {}
    for name in args.servers:
        results[name] = runners[name]()
    text = report(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "report": text}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
