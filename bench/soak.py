"""Soak a running server with streamed requests, a share of which disconnect mid-stream, and report
the server's resident memory (RSS) after a warm-up round, after the soak, and after an idle spell.

    python bench/soak.py --url http://127.0.0.1:8000 --pid PID --requests 400 --concurrency 16

The question it answers (issue 12): does memory come back to where it was after warm-up, or does
every request leave something behind? Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def one_request(
    client: httpx.AsyncClient, model: str, rng: random.Random, disconnect_share: float, max_words: int, max_tokens: int
) -> dict[str, Any]:
    """One streamed completion of a random prompt length (4 to max_words words) and length (4 to
    max_tokens tokens); with probability disconnect_share the client leaves after a few events."""
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "river", "stone"]) for _ in range(rng.randint(4, max_words)))
    body = {"model": model, "prompt": words, "max_tokens": rng.randint(4, max_tokens), "stream": True, "temperature": 0.8}
    leave_after = rng.randint(1, 4) if rng.random() < disconnect_share else None
    events = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "left": False}
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events += 1
                if leave_after is not None and events >= leave_after:
                    return {"status": 200, "left": True}
    return {"status": 200, "left": False}


async def soak(
    url: str, requests: int, concurrency: int, disconnect_share: float, seed: int, max_words: int = 200, max_tokens: int = 48
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        gate = asyncio.Semaphore(concurrency)

        async def limited() -> dict[str, Any]:
            async with gate:
                return await one_request(client, model, rng, disconnect_share, max_words, max_tokens)

        return await asyncio.gather(*(limited() for _ in range(requests)))


async def wait_idle(url: str, timeout: float = 60) -> None:
    """Until the server has no running or waiting request (disconnects free their slots within a step)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            text = (await client.get("/metrics")).text
            if "llamaserve_requests_running 0.0" in text and "llamaserve_requests_waiting 0.0" in text:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError("the server did not become idle")


def run(
    url: str,
    pid: int,
    requests: int,
    concurrency: int,
    disconnect_share: float,
    idle_s: float,
    seed: int,
    warmup_requests: int | None = None,
    max_words: int = 200,
    max_tokens: int = 48,
) -> dict[str, Any]:
    """Warm-up round (default: a quarter of the requests), then the soak; RSS at each point, in MiB."""
    warmup = max(requests // 4, concurrency) if warmup_requests is None else warmup_requests
    warm = asyncio.run(soak(url, warmup, concurrency, disconnect_share, seed, max_words, max_tokens))
    asyncio.run(wait_idle(url))
    after_warmup = rss_mib(pid)
    results = asyncio.run(soak(url, requests, concurrency, disconnect_share, seed + 1, max_words, max_tokens))
    asyncio.run(wait_idle(url))
    after_soak = rss_mib(pid)
    time.sleep(idle_s)
    after_idle = rss_mib(pid)
    everything = warm + results
    return {
        "requests": len(everything),
        "disconnected": sum(r["left"] for r in everything),
        "status_5xx": sum(r["status"] >= 500 for r in everything),
        "status_other": sorted({r["status"] for r in everything if r["status"] != 200}),
        "rss_after_warmup_mib": round(after_warmup, 1),
        "rss_after_soak_mib": round(after_soak, 1),
        "rss_after_idle_mib": round(after_idle, 1),
        "growth_after_warmup": round(after_idle / after_warmup - 1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, required=True, help="the server's process id (its RSS is measured)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--disconnect-share", type=float, default=0.2)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-requests", type=int, default=None, help="default: a quarter of --requests")
    parser.add_argument("--max-words", type=int, default=200, help="longest prompt, in words (4 to this many)")
    parser.add_argument("--max-tokens", type=int, default=48, help="longest completion, in tokens (4 to this many)")
    args = parser.parse_args()
    report = run(
        args.url,
        args.pid,
        args.requests,
        args.concurrency,
        args.disconnect_share,
        args.idle_s,
        args.seed,
        args.warmup_requests,
        args.max_words,
        args.max_tokens,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
