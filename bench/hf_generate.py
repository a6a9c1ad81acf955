"""transformers' `generate` on the same weights: the baseline the HTTP server is compared with.

No HTTP shim: this measures `generate` directly, in float32, greedy, with `min_new_tokens` so the
output length is exact.
- batch 1, streaming: a streamer timestamps every new token; decode tok/s = (tokens - 1) / (last - first),
  time to first token = first - start (prefill included).
- batch N: N different prompts of exactly the same token length (no padding), aggregate output
  tok/s = N * new tokens / wall time.

Run standalone or from bench/run_peers.py (which reads the JSON it prints last):
    python -m bench.hf_generate --model ~/.cache/llamaserve/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 \
        --prompt-tokens 128 --output-tokens 128 --batch 1 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from bench.loadgen import make_prompt


class TimingStreamer(BaseStreamer):
    """Records when each generated token arrives; generate's first put() is the prompt, skipped."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self) -> None:
        pass


def load(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A GGUF file or an HF model directory, as a float32 transformers model in eval mode."""
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ValueError as exc:
        if "accelerate" not in str(exc):
            raise
        model = load_gguf_without_accelerate(path)
    return model.eval(), tokenizer


def load_gguf_without_accelerate(path: Path) -> torch.nn.Module:
    """from_pretrained(gguf_file=...) insists on `accelerate`; transformers' own GGUF converter
    (dequantise + Q/K un-permute) gives the same weights without it."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v).float() for k, v in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model


def prompt_batch(tokenizer: PreTrainedTokenizerBase, batch: int, num_tokens: int, seed: int) -> torch.Tensor:
    """(batch, num_tokens) ids of different plain-word prompts cut to the same length: no padding."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        ids = tokenizer(make_prompt(num_tokens + 8, rng), add_special_tokens=False).input_ids
        if len(ids) < num_tokens:
            raise RuntimeError(f"prompt tokenized to {len(ids)} < {num_tokens} tokens")
        rows.append(ids[:num_tokens])
    return torch.tensor(rows)


@torch.inference_mode()
def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, streamer: BaseStreamer | None = None) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=model.config.eos_token_id,
    )


def measure_stream(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    streamer = TimingStreamer()
    start = time.perf_counter()
    generate(model, ids, new_tokens, streamer)
    times = streamer.times
    if len(times) != new_tokens:
        raise RuntimeError(f"asked for {new_tokens} tokens, the streamer saw {len(times)}")
    return {"ttft_s": times[0] - start, "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "e2e_s": times[-1] - start}


def measure_batch(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    out = generate(model, ids, new_tokens)
    seconds = time.perf_counter() - start
    produced = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"seconds": seconds, "output_tokens": produced, "output_tok_s": produced / seconds}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def run(
    path: Path, *, threads: int, batches: list[int], prompt_tokens: int, output_tokens: int, repeats: int, seed: int = 0
) -> dict[str, Any]:
    """All measurements for one model; each entry holds the medians and the individual runs."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    model, tokenizer = load(path)
    report: dict[str, Any] = {
        "label": "transformers",
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "repeats": repeats,
        "load_s": time.perf_counter() - started,
        "batches": {},
    }
    generate(model, prompt_batch(tokenizer, 1, prompt_tokens, seed), 4)  # warm-up
    for batch in batches:
        runs = []
        for r in range(repeats):
            ids = prompt_batch(tokenizer, batch, prompt_tokens, seed + 1000 * batch + r)
            runs.append(measure_stream(model, ids, output_tokens) if batch == 1 else measure_batch(model, ids, output_tokens))
        report["batches"][str(batch)] = {"median": median_of(runs), "runs": runs}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="GGUF file or HF model directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes; 1 is measured streaming")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report to this path")
    args = p.parse_args(argv)
    model_path = args.model.expanduser()
    if not model_path.exists():
        print(f"hf_generate: no model at {model_path}", file=sys.stderr)
        return 2
    if min(args.batch) < 1 or args.prompt_tokens < 1 or args.output_tokens < 2 or args.repeats < 1:
        print("hf_generate: batch, prompt-tokens, repeats must be >= 1 and output-tokens >= 2", file=sys.stderr)
        return 2
    report = run(
        model_path,
        threads=args.threads,
        batches=args.batch,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        repeats=args.repeats,
        seed=args.seed,
    )
    for batch, entry in report["batches"].items():
        m = entry["median"]
        if batch == "1":
            print(f"transformers batch 1 streaming: decode {m['decode_tok_s']:.2f} tok/s, TTFT {m['ttft_s'] * 1000:.0f} ms")
        else:
            print(f"transformers batch {batch}: {m['output_tok_s']:.2f} output tok/s ({m['seconds']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
