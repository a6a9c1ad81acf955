"""Where an engine step's time goes: the model's forward vs everything else (scheduling, sampling,
detokenizing, stop strings), at one concurrency, on the default model.

    python -m bench.step_profile --concurrency 32 --output-tokens 64

Issue 6 asks that the server's own work stay <= 10% of step time at batch 32. The HTTP share is
measured separately by comparing bench/loadgen's inter-token latency with this step time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.engine_throughput import DEFAULT_MODEL, in_thread, warn_if_busy
from model.threads import configure_threads

if TYPE_CHECKING:  # torch and what imports it load inside the functions, after main() set the thread policy
    import torch

    from app.engine import Engine
    from model.llama import Transformer
    from model.sampling import SamplingParams


class TimedModel:
    """Wraps the model so every forward's wall time is recorded (the engine thread calls it); the
    rest of the engine's model protocol is passed through."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.max_batch_size = model.max_batch_size
        self.max_seq_len = model.max_seq_len
        self.forward_s: list[float] = []

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = self.model(*args, **kwargs)
        self.forward_s.append(time.perf_counter() - start)
        return out


TOPICS = [
    "the history of Rome",
    "how bread is baked",
    "the water cycle",
    "why the sky is blue",
    "the rules of chess",
    "how a bicycle works",
    "the life of bees",
    "the first moon landing",
]


def prompts_for(tokenizer: Any, n: int, prompt_tokens: int) -> list[list[int]]:
    """Real text (so the model's distributions are realistic for top_p), cut to prompt_tokens."""
    prompts = []
    for i in range(n):
        text = f"Request {i}. Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}. " * 20
        prompts.append(tokenizer.encode(text)[:prompt_tokens])
    return prompts


async def run(engine: Engine, prompts: list[list[int]], output_tokens: int, sampling: SamplingParams) -> float:
    from app.engine import GenerationRequest

    start = time.perf_counter()
    handles = [
        engine.submit(GenerationRequest(p, sampling, max_tokens=output_tokens, ignore_eos=True, stop=["\n\n\n"])) for p in prompts
    ]
    for handle in handles:
        async for _ in handle:
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--quantization", default="auto", help="as the server's flag: auto, none or int4")
    args = parser.parse_args()
    configure_threads(args.threads)
    from app.engine import Engine
    from model.checkpoint import load_model
    from model.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=0)
    warn_if_busy(args.threads)
    n = args.concurrency
    loaded = in_thread(
        lambda: load_model(
            args.model, max_batch_size=n, max_seq_len=args.prompt_tokens + args.output_tokens + 8, quantization=args.quantization
        )
    )
    timed = TimedModel(loaded.model)
    engine = Engine(timed, loaded.tokenizer, max_batch_size=n, max_seq_len=loaded.model.max_seq_len)
    engine.start()
    try:
        prompts = prompts_for(loaded.tokenizer, n, args.prompt_tokens)
        asyncio.run(run(engine, prompts, 4, sampling))  # warm-up
        timed.forward_s.clear()
        steps_before = engine.stats().steps
        wall = asyncio.run(run(engine, prompts, args.output_tokens, sampling))
        steps = engine.stats().steps - steps_before
    finally:
        engine.shutdown()
    forward = sum(timed.forward_s)
    print(
        f"concurrency {n}, temperature {args.temperature}, top_p {args.top_p}: "
        f"{steps} steps in {wall:.2f} s ({wall / steps * 1000:.1f} ms/step), "
        f"forward {forward:.2f} s, everything else {wall - forward:.2f} s "
        f"= {(wall - forward) / wall * 100:.1f}% of the time (target <= 10%)"
    )


if __name__ == "__main__":
    main()
