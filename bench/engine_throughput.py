"""Engine throughput vs transformers `generate`: same weights, same prompts, same batch, one run.

For each concurrency N (default 1, 8, 32): N greedy requests of exactly `--prompt-tokens` prompt
tokens and `--output-tokens` generated tokens (EOS ignored), submitted at once to the Engine (no
HTTP), then the same N prompts as one batch through transformers' `generate` (float32, no padding).
Reported per side:
- output tok/s: N * output tokens / wall time (prefill included),
- decode tok/s: N * (output tokens - 1) / (last token time - first token time).
Ratios are ours / transformers. `--batch-invariant both` also measures the batch-dependent fast
paths (`--no-batch-invariant`) in the same run and prints what invariance costs (invariant / fast).
Do not run this on a busy machine: it warns when the load average
is high, since spin-waiting OpenMP threads then lose most of their speed.

Threads: every live thread that ran a parallel torch op keeps an OpenMP pool, and with more pool
threads than cores libgomp stops spin-waiting (decode ~1.7x slower, docs/performance.md). So each
side runs alone: torch work happens in short-lived threads, and a fresh Engine (whose thread exits
on shutdown) is made for each measurement. Both sides get the server's thread policy (model/threads.py).

    python -m bench.engine_throughput --threads 2 --batches 1 8 32 --prompt-tokens 64 --output-tokens 64
    python -m bench.engine_throughput --skip-hf --batch-invariant both --batches 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.threads import configure_threads

if TYPE_CHECKING:  # torch and what imports it load inside the functions, after main() set the thread policy
    import torch

    from app.engine import Engine

DEFAULT_MODEL = Path.home() / ".cache" / "llamaserve" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def warn_if_busy(threads: int) -> None:
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > max(0.5, cores - threads):
        print(
            f"WARNING: load average {load:.1f} on {cores} cores: other work competes, numbers will be low and noisy",
            file=sys.stderr,
        )


async def engine_run(engine: Engine, prompts: list[list[int]], output_tokens: int) -> dict[str, float]:
    from app.engine import GenerationRequest
    from model.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    start = time.monotonic()
    handles = [engine.submit(GenerationRequest(p, greedy, max_tokens=output_tokens, ignore_eos=True)) for p in prompts]
    finals = []
    for handle in handles:
        async for out in handle:
            if out.finish_reason is not None:
                finals.append(out)
    end = time.monotonic()
    produced = sum(out.num_generated_tokens for out in finals)
    if produced != len(prompts) * output_tokens:
        raise RuntimeError(f"asked for {len(prompts) * output_tokens} tokens, got {produced}")
    first = min(out.timings.first_token for out in finals if out.timings and out.timings.first_token)
    last = max(out.timings.finished for out in finals if out.timings and out.timings.finished)
    return {
        "seconds": end - start,
        "output_tok_s": produced / (end - start),
        "decode_tok_s": len(prompts) * (output_tokens - 1) / (last - first),
    }


def in_thread(fn: Any, *args: Any) -> Any:
    """Run fn in a thread that exits afterwards, so its OpenMP pool does not outlive the work."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def measure_engine(
    loaded: Any, max_batch: int, prefill_chunk: int, prompts: list[list[int]], output_tokens: int
) -> dict[str, float]:
    """A fresh engine for one measurement: its thread (and OpenMP pool) is gone when this returns."""
    from app.engine import Engine

    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        max_batch_size=max_batch,
        max_seq_len=loaded.model.max_seq_len,
        prefill_chunk=prefill_chunk,
    )
    engine.start()
    try:
        return asyncio.run(engine_run(engine, prompts, output_tokens))
    finally:
        engine.shutdown()


def hf_run(model: torch.nn.Module, ids: torch.Tensor, output_tokens: int) -> dict[str, float]:
    from bench.hf_generate import TimingStreamer, generate

    streamer = TimingStreamer()
    start = time.perf_counter()
    out = generate(model, ids, output_tokens, streamer)
    end = time.perf_counter()
    produced = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    times = streamer.times
    return {
        "seconds": end - start,
        "output_tok_s": produced / (end - start),
        "decode_tok_s": ids.shape[0] * (output_tokens - 1) / (times[-1] - times[0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--skip-hf", action="store_true", help="measure the engine only")
    parser.add_argument("--quantization", default="auto", help="as the server's flag: auto, none or int4")
    parser.add_argument(
        "--batch-invariant",
        choices=["on", "off", "both"],
        default="on",
        help="as the server's flag; both: measure each and print the cost of invariance",
    )
    args = parser.parse_args(argv)
    if args.output_tokens < 2 or min(args.batches) < 1:
        parser.error("need --output-tokens >= 2 and batches >= 1")
    if not args.model.exists():
        parser.error(f"no model at {args.model} (run `python -m model.fetch`)")
    configure_threads(args.threads)
    warn_if_busy(args.threads)

    from bench.hf_generate import load as hf_load
    from bench.hf_generate import prompt_batch
    from model.checkpoint import load_model
    from model.quant import QUANTIZATIONS

    if args.quantization not in QUANTIZATIONS:  # before minutes of loading
        parser.error(f"--quantization must be one of {', '.join(QUANTIZATIONS)}")

    hf_model, hf_tokenizer = in_thread(hf_load, args.model)  # its tokenizer also makes the shared prompts
    max_batch = max(args.batches)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.batch_invariant]
    models = {
        invariant: in_thread(
            lambda invariant=invariant: load_model(
                args.model,
                max_batch_size=max_batch,
                max_seq_len=args.prompt_tokens + args.output_tokens + 8,
                quantization=args.quantization,
                batch_invariant=invariant,
            )
        )
        for invariant in modes
    }
    first = next(iter(models.values()))
    report: dict[str, Any] = {
        "threads": args.threads,
        "quantization": first.quantization,
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "load_avg": os.getloadavg()[0],
        "batches": {},
    }
    warm = prompt_batch(hf_tokenizer, 1, args.prompt_tokens, seed=999)
    for loaded in models.values():
        measure_engine(loaded, max_batch, args.prefill_chunk, warm.tolist(), 4)
    if not args.skip_hf:
        in_thread(hf_run, hf_model, warm, 4)
    names = {True: "invariant", False: "fast"}
    header = f"{'N':>4}" + "".join(f" {names[m] + ' out tok/s':>19} {names[m] + ' decode':>16}" for m in models)
    if len(models) == 2:
        header += f" {'inv/fast out':>13} {'inv/fast dec':>13}"
    if not args.skip_hf:
        header += f" {'hf out tok/s':>13} {'hf decode':>10} {'ratio out':>10} {'ratio dec':>10}"
    print(header)
    for n in args.batches:
        ids = prompt_batch(hf_tokenizer, n, args.prompt_tokens, seed=n)
        entry: dict[str, Any] = {}
        line = f"{n:>4}"
        for invariant, loaded in models.items():  # one after another, never concurrently
            entry[names[invariant]] = measure_engine(loaded, max_batch, args.prefill_chunk, ids.tolist(), args.output_tokens)
            line += f" {entry[names[invariant]]['output_tok_s']:>19.1f} {entry[names[invariant]]['decode_tok_s']:>16.1f}"
        ours = entry[names[modes[0]]]
        entry["ours"] = ours
        if len(models) == 2:
            entry["invariant_over_fast_output"] = entry["invariant"]["output_tok_s"] / entry["fast"]["output_tok_s"]
            entry["invariant_over_fast_decode"] = entry["invariant"]["decode_tok_s"] / entry["fast"]["decode_tok_s"]
            line += f" {entry['invariant_over_fast_output']:>13.2f} {entry['invariant_over_fast_decode']:>13.2f}"
        if not args.skip_hf:
            theirs = in_thread(hf_run, hf_model, ids, args.output_tokens)
            entry["transformers"] = theirs
            entry["ratio_output"] = ours["output_tok_s"] / theirs["output_tok_s"]
            entry["ratio_decode"] = ours["decode_tok_s"] / theirs["decode_tok_s"]
            line += (
                f" {theirs['output_tok_s']:>13.1f} {theirs['decode_tok_s']:>10.1f}"
                f" {entry['ratio_output']:>10.2f} {entry['ratio_decode']:>10.2f}"
            )
        print(line, flush=True)
        report["batches"][str(n)] = entry
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
