"""What the playground's engine panel costs the engine: decode throughput with nobody polling
GET /engine/snapshot's builder, with one open page (2 polls a second), and with 25 pages' worth
(50 a second), alternating, on the default model; plus the time to build one snapshot.

    GOMP_SPINCOUNT=20000 python -m bench.engine_snapshot --rows 8 --tokens 64 --repeats 3

The poller runs in its own thread as the server's event loop would (JSON-encoding included), so it
competes for the GIL and the lock exactly as a real page does. Prints one line per rate and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from typing import Any

from bench.engine_throughput import in_thread
from model.fetch import default_model_path


def poll(engine: Any, per_second: float, stop: threading.Event, timings: list[float]) -> None:
    from app.routes.playground import snapshot_of

    while not stop.wait(1 / per_second):
        start = time.perf_counter()
        json.dumps(snapshot_of(engine))
        timings.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="concurrent requests (slots)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from app.engine import Engine, GenerationRequest
    from model.checkpoint import load_model
    from model.sampling import SamplingParams
    from model.threads import configure_threads

    configure_threads(args.threads)
    loaded = in_thread(lambda: load_model(default_model_path(), max_batch_size=args.rows, max_seq_len=256, quantization="auto"))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=args.rows, max_seq_len=256, prefix_cache=False)
    engine.start()
    prompt = loaded.tokenizer.encode("Write a long story about the sea.")

    async def generate() -> float:
        start = time.perf_counter()
        handles = [
            engine.submit(
                GenerationRequest(prompt, SamplingParams(temperature=0.8, seed=i), max_tokens=args.tokens, ignore_eos=True)
            )
            for i in range(args.rows)
        ]
        for handle in handles:
            async for _ in handle:
                pass
        return args.rows * args.tokens / (time.perf_counter() - start)

    def measure(per_second: float) -> tuple[float, list[float]]:
        stop, timings = threading.Event(), []
        poller = threading.Thread(target=poll, args=(engine, per_second, stop, timings)) if per_second else None
        if poller:
            poller.start()
        try:
            return asyncio.run(generate()), timings
        finally:
            stop.set()
            if poller:
                poller.join()

    rates = (0.0, 2.0, 50.0)
    results: dict[float, list[float]] = {rate: [] for rate in rates}
    build: list[float] = []
    try:
        measure(0.0)  # warm-up: first shapes
        for repeat in range(args.repeats):
            for rate in rates[repeat % 3 :] + rates[: repeat % 3]:  # rotating, so drift and order hit every rate alike
                tok_s, timings = measure(rate)
                results[rate].append(tok_s)
                build += timings
    finally:
        engine.shutdown()
    base = statistics.median(results[0.0])
    print(f"{loaded.quantization}, {args.rows} rows x {args.tokens} tokens, {args.threads} threads, median of {args.repeats}")
    print(f"{'polls/s':>8} {'tok/s':>8} {'vs none':>8}")
    for rate in rates:
        tok_s = statistics.median(results[rate])
        print(f"{rate:>8.0f} {tok_s:>8.1f} {tok_s / base:>8.3f}")
    if build:
        print(f"one snapshot (built + JSON-encoded): median {1e6 * statistics.median(build):.0f} us over {len(build)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
