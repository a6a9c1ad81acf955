"""Fidelity of the fast numeric paths: how far int4 and bfloat16 move the model's distribution.

Why: the int4 path (bfloat16 activations into torch's int4 kernel, dense bfloat16 or float32 weights
for prefill) rounds differently from the float32 reference, so exact greedy strings flip at
near-ties on some CPUs. What matters to users is the distribution, so this measures it on a fixed
text against float32 -- the same numbers tests/test_fidelity.py holds to thresholds.

Paths (`--paths`):
- float32: `quantization="none"`, the reference (matches transformers to 1e-4).
- int4-bf16: `quantization="int4"` with $LLAMASERVE_DENSE_BF16=on: the int4 kernel for decode rows
  and small prefill chunks, dense bfloat16 weights for larger ones (the default on AMX/AVX512-BF16
  CPUs). Skipped where bfloat16 GEMM is not native (emulated there, ~70x slower).
- int4-fp32: `quantization="int4"` with $LLAMASERVE_DENSE_BF16=off: dense float32 prefill (the
  default elsewhere). Both int4 paths are skipped where the int4 kernel is unavailable.

On the text (tests/data/fidelity.txt, ~780 SmolLM2 tokens: original prose written for this
project, no third-party licence), each path's logits are compared with float32's *prefill* logits:
- prefill: all logits, in chunks of `--chunk` (512) tokens, one prompt per forward, positions
  continuing in the same slot (as the engine prefills);
- decode: the same text one token per forward (T=1 rows, teacher forcing), batch 1, so the decode
  kernels are measured. With batch invariance a row's numbers are the same bits in any batch (the
  spread below checks it), so copies in other slots would add nothing but time.
Per path and mode: perplexity of the text, mean and max KL(float32 || path) per token, top-1
agreement with float32 (%), max |logprob difference| of the text's actual next tokens. The float32
decode row is float32 decode vs float32 prefill: the floor set by kernel choice alone.

Spread over batch compositions: a 40-token prompt decodes 16 greedy tokens alone (batch 1), then
again among 7 (one of them longer than a 512-key block) and 31 other rows of different lengths, with
batch_invariant on and off, for each path. The prompt's row is fed the tokens it chose alone, so
every step compares the same context; reported are the max |logit| and |logprob| differences from
alone over the 16 steps and whether its greedy choice ever changed. Expected exactly 0 with
batch_invariant=True (model/invariance.py).

    python -m bench.fidelity --threads 2 --json fidelity.json

Takes ~3.5 minutes on 2 cores (most of it the three 780-token decodes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from model import quant
from model.checkpoint import LoadedModel, load_model

DEFAULT_MODEL = Path.home() / ".cache" / "llamaserve" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "fidelity.txt"
CHUNK = 512  # the engine's default prefill chunk
MAX_SEQ_LEN = 1024
MAX_BATCH = 32  # the spread's largest crowd
# name -> (quantization, $LLAMASERVE_DENSE_BF16 at load time; None leaves it alone)
PATHS: dict[str, tuple[str, str | None]] = {
    "float32": ("none", None),
    "int4-bf16": ("int4", "on"),
    "int4-fp32": ("int4", "off"),
}
DISPATCH_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", quant.DENSE_BF16_ENV)


def read_text(path: Path = TEXT) -> str:
    return path.read_text(encoding="utf-8")


def unavailable(path: str) -> str | None:
    """Why `path` cannot run (usefully) on this machine, or None."""
    quantization, bf16 = PATHS[path]
    if quantization == "int4" and not quant.int4_kernel_available():
        return f"no vectorised int4 kernel here (torch {torch.__version__}, {quant.cpu_capability()})"
    if bf16 == "on" and not quant.native_bf16_matmul():
        return "no native bfloat16 GEMM on this CPU (emulated bf16 is ~70x slower)"
    return None


@contextmanager
def env_var(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with None, leave alone) an environment variable, restoring it afterwards."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def load_path(
    model_path: Path, path: str, *, batch_invariant: bool = True, max_batch_size: int = MAX_BATCH, max_seq_len: int = MAX_SEQ_LEN
) -> LoadedModel:
    """The model on one numeric path; $LLAMASERVE_DENSE_BF16 is read at load time only."""
    quantization, bf16 = PATHS[path]
    with env_var(quant.DENSE_BF16_ENV, bf16):
        loaded = load_model(
            model_path,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            quantization=quantization,
            batch_invariant=batch_invariant,
        )
    if loaded.quantization != quantization:
        raise RuntimeError(f"{path}: asked for quantization {quantization}, got {loaded.quantization}")
    return loaded


@torch.inference_mode()
def prefill_logits(model: Any, tokens: list[int], slot: int = 0, chunk: int = CHUNK) -> torch.Tensor:
    """(T, V) logits of every position: one prompt per forward, chunks of `chunk` tokens."""
    out = []
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        logits = model(torch.tensor([part]), torch.arange(start, start + len(part))[None], torch.tensor([slot]), all_logits=True)
        out.append(logits[0])
    return torch.cat(out)


@torch.inference_mode()
def decode_logits(model: Any, tokens: list[int], slot: int = 0) -> torch.Tensor:
    """(T, V) logits of every position, one token per forward (T=1 rows, teacher forcing)."""
    out = torch.empty(len(tokens), model.args.vocab_size)
    slots = torch.tensor([slot])
    for i, token in enumerate(tokens):
        out[i] = model(torch.tensor([[token]]), torch.tensor([[i]]), slots)[0]
    return out


@torch.inference_mode()
def compare(reference: torch.Tensor, logits: torch.Tensor, tokens: list[int]) -> dict[str, float]:
    """Distribution metrics of `logits` against `reference`, both (T, V); row i predicts tokens[i + 1].

    KL(reference || logits) per position in float64; perplexities of the text's next tokens under
    both (`ppl`, `ppl_reference`, over the same positions).
    """
    n = min(len(logits), len(tokens) - 1)
    targets = torch.tensor(tokens[1 : n + 1])
    kls, nll, nll_ref, top1, lp_diff = [], 0.0, 0.0, 0, 0.0
    for start in range(0, n, 128):
        stop = min(start + 128, n)
        ref = torch.log_softmax(reference[start:stop].double(), -1)
        got = torch.log_softmax(logits[start:stop].double(), -1)
        kls.append((ref.exp() * (ref - got)).sum(-1))
        tgt = targets[start:stop, None]
        ref_t, got_t = ref.gather(-1, tgt)[:, 0], got.gather(-1, tgt)[:, 0]
        nll -= float(got_t.sum())
        nll_ref -= float(ref_t.sum())
        lp_diff = max(lp_diff, float((ref_t - got_t).abs().max()))
        top1 += int((ref.argmax(-1) == got.argmax(-1)).sum())
    kl = torch.cat(kls)
    return {
        "tokens": n,
        "ppl": float(torch.tensor(nll / n).exp()),
        "ppl_reference": float(torch.tensor(nll_ref / n).exp()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_pct": 100.0 * top1 / n,
        "max_logprob_diff": lp_diff,
    }


# ---------------------------------------------------------------- spread over batch compositions


@torch.inference_mode()
def decode_crowd(
    model: Any, target: list[int], forced: list[int] | None, others: list[list[int]], slot: int, steps: int
) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill `target` into `slot` and each of `others` into the remaining slots (one prompt per
    forward), then decode all rows together, one token each per forward. The target row is fed
    `forced` (greedy from its own logits when None); the others decode greedily.
    Returns the target row's logits per step and its argmax per step."""
    slot_of = [s for s in range(len(others) + 1) if s != slot]
    rows = [(target, slot)] + [(prompt, s) for prompt, s in zip(others, slot_of)]
    tokens = [int(prefill_logits(model, prompt, s)[-1].argmax()) for prompt, s in rows]
    if forced is not None:
        tokens[0] = forced[0]
    lengths = [len(prompt) for prompt, _ in rows]
    slots = torch.tensor([s for _, s in rows])
    logits_out, greedy = [], []
    for step in range(steps):
        logits = model(torch.tensor(tokens)[:, None], torch.tensor(lengths)[:, None], slots)
        logits_out.append(logits[0].clone())
        greedy.append(int(logits[0].argmax()))
        tokens = logits.argmax(-1).tolist()
        if forced is not None and step + 1 < len(forced):
            tokens[0] = forced[step + 1]
        lengths = [n + 1 for n in lengths]
    return logits_out, greedy


def crowd_prompts(text_tokens: list[int], count: int, seed: int, long: bool) -> list[list[int]]:
    """`count` slices of the text, 5-120 tokens long; with `long` the first one is 530 tokens (its
    keys need a second 512-key block)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = 530 if long and i == 0 else int(torch.randint(5, 121, (1,), generator=generator))
        start = int(torch.randint(0, len(text_tokens) - length, (1,), generator=generator))
        out.append(text_tokens[start : start + length])
    return out


def spread(model: Any, text_tokens: list[int], steps: int = 16, prompt_tokens: int = 40) -> dict[str, Any]:
    """The first `prompt_tokens` of the text, decoded alone and among 7 and 31 other rows."""
    target = text_tokens[:prompt_tokens]
    # What it generates alone: the tokens it is fed in every crowd, so contexts stay the same.
    first = int(prefill_logits(model, target, 0)[-1].argmax())
    alone, greedy_alone = decode_crowd(model, target, None, [], 0, steps)
    forced = [first] + greedy_alone[:-1]
    result: dict[str, Any] = {}
    # The long row goes in the small crowd only: beside 31 rows, a second key block makes every
    # row's step gather 1024 keys per layer from the cache (~1 s a step in float32 on 2 cores).
    for others, slot in ((7, 5), (31, 17)):
        prompts = crowd_prompts(text_tokens, others, seed=others, long=others == 7)
        crowd, greedy = decode_crowd(model, target, forced, prompts, slot, steps)
        logit_diff = max(float((a - b).abs().max()) for a, b in zip(alone, crowd))
        logprob_diff = max(float((torch.log_softmax(a, -1) - torch.log_softmax(b, -1)).abs().max()) for a, b in zip(alone, crowd))
        result[f"batch_{others + 1}"] = {
            "max_logit_diff": logit_diff,
            "max_logprob_diff": logprob_diff,
            "greedy_same": greedy == greedy_alone,
        }
    return result


# ---------------------------------------------------------------- report


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16_matmul": quant.native_bf16_matmul(),
        "int4_kernel": quant.int4_kernel_available(),
        "env": {name: os.environ[name] for name in DISPATCH_ENV if name in os.environ},
    }


def print_tables(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"\n{m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['cpu_capability']}, "
        f"native bf16 {m['native_bf16_matmul']}{', env ' + str(m['env']) if m['env'] else ''}"
    )
    print(f"text: {report['text_tokens']} tokens; reference: float32 prefill (ppl {report['reference_ppl']:.4f})\n")
    print("| path | mode | tokens | ppl | mean KL | max KL | top-1 agree | max \\|Δ logprob\\| | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path, entry in report["paths"].items():
        if "skipped" in entry:
            print(f"| {path} | skipped: {entry['skipped']} | | | | | | | |")
            continue
        for mode in ("prefill", "decode"):
            r = entry[mode]
            print(
                f"| {path} | {mode} | {r['tokens']} | {r['ppl']:.4f} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | "
                f"{r['top1_pct']:.2f}% | {r['max_logprob_diff']:.4f} | {r['seconds']:.1f} |"
            )
    if not any("spread" in entry for entry in report["paths"].values()):
        return
    print(f"\nSpread of one prompt's {report['steps']} greedy decode steps over batch compositions (vs alone, batch 1):\n")
    print("| path | batch_invariant | batch | max \\|Δ logit\\| | max \\|Δ logprob\\| | greedy same |")
    print("|---|---|---|---|---|---|")
    for path, entry in report["paths"].items():
        for invariant, crowds in entry.get("spread", {}).items():
            for batch, r in crowds.items():
                print(
                    f"| {path} | {invariant} | {batch.removeprefix('batch_')} | {r['max_logit_diff']:.3g} | "
                    f"{r['max_logprob_diff']:.3g} | {'yes' if r['greedy_same'] else 'NO'} |"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument(
        "--paths", nargs="+", choices=list(PATHS), default=list(PATHS), help="float32 (the reference) always runs first"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--decode-tokens", type=int, default=0, help="decode only the first N tokens (0: all)")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="prefill chunk, as the engine's --prefill-chunk")
    parser.add_argument("--steps", type=int, default=16, help="decode steps of the spread measurement")
    parser.add_argument("--skip-spread", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if not args.model.exists():
        parser.error(f"no model at {args.model} (run `python -m model.fetch`)")
    torch.set_num_threads(args.threads)
    paths = ["float32"] + [p for p in args.paths if p != "float32"]

    report: dict[str, Any] = {
        "machine": machine(args.threads),
        "model": str(args.model),
        "chunk": args.chunk,
        "steps": args.steps,
        "paths": {},
    }
    reference: torch.Tensor | None = None
    tokens: list[int] = []
    for path in paths:
        reason = unavailable(path)
        if reason is not None:
            print(f"SKIP {path}: {reason}", file=sys.stderr)
            report["paths"][path] = {"skipped": reason}
            continue
        loaded = load_path(args.model, path)
        if not tokens:
            tokens = loaded.tokenizer.encode(read_text(args.text))
            if len(tokens) > loaded.model.max_seq_len:
                parser.error(f"the text is {len(tokens)} tokens, the model takes {loaded.model.max_seq_len}")
            report["text_tokens"] = len(tokens)
        entry: dict[str, Any] = {}
        start = time.perf_counter()
        prefill = prefill_logits(loaded.model, tokens, chunk=args.chunk)
        seconds = time.perf_counter() - start
        if reference is None:
            reference = prefill
            report["reference_ppl"] = compare(reference, reference, tokens)["ppl"]
        entry["prefill"] = compare(reference, prefill, tokens) | {"seconds": seconds}
        del prefill
        decoded = tokens[: args.decode_tokens + 1] if args.decode_tokens else tokens
        start = time.perf_counter()
        decode = decode_logits(loaded.model, decoded)
        seconds = time.perf_counter() - start
        entry["decode"] = compare(reference[: len(decoded)], decode, decoded) | {"seconds": seconds}
        del decode
        print(
            f"{path}: prefill KL {entry['prefill']['kl_mean']:.2e}, decode KL {entry['decode']['kl_mean']:.2e}",
            file=sys.stderr,
            flush=True,
        )
        if not args.skip_spread:
            entry["spread"] = {"on": spread(loaded.model, tokens, args.steps)}
            del loaded
            entry["spread"]["off"] = spread(load_path(args.model, path, batch_invariant=False).model, tokens, args.steps)
        report["paths"][path] = entry
    print_tables(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
