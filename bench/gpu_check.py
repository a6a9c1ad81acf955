"""GPU check (issue 17 item 4): correctness tests and speed measurements on one GPU, one JSON.

    python -m bench.gpu_check [--dry-run] [--device cuda|cpu] [--out gpu_check.json]
    bash bench/gpu_check.sh [--dry-run] [OUT_DIR]        # the same, with the install step

Tests (pass/fail, with their numbers; the exit code is 1 when one fails or any section errors):
- compiled_vs_eager: float32 logits of the compiled forward (`compiled_forward`: the project's
  static step when model/static_step.py exists, else torch.compile, CUDA graphs on CUDA) against
  eager, on a prefill chunk and on decode steps of 4 rows at different lengths (TF32 off).
- batched_vs_single: greedy tokens through the Engine, each prompt alone and all together in one
  batch (different slots and lengths, a prompt longer than the prefill chunk), float32, with
  batch_invariant on (the server's default) and off: the tokens must be identical.
- tensor_parallel: 2 ranks (NCCL, one GPU each; skipped with a message on one GPU; gloo in the dry
  run) against one process: float32 logits of a prefill and a decode step, greedy engine tokens.
- bf16_fidelity: the same random model in bfloat16 against float32, teacher forcing on random
  prompts (prefill) and one token per forward (decode): mean KL(float32 || bf16) and top-1
  agreement, held to tests/test_fidelity.py's thresholds (mean KL < 0.005, top-1 >= 97%, counted
  where float32's top-2 margin exceeds bf16's resolution: `distribution_metrics`).
Measurements (passed = ran and produced numbers; targets reported beside them):
- environment: torch, device, SMs, memory, and the device-to-device copy bandwidth (bytes read +
  written / time, CUDA events, after warm-up).
- decode_8b: batch-1 decode of a random-weight Llama-3-8B-shaped bfloat16 model, eager and
  compiled: weight bytes read per token x tok/s as a fraction of the copy bandwidth (target 0.75).
  Weights are made on the GPU (built on the meta device, then random bf16 in place).
- throughput: aggregate output tok/s of 256 requests (prompt and output lengths uniform in
  100-1024, seeded, EOS ignored) through the Engine on a Qwen2.5-0.5B-shaped random bf16 model.

--dry-run runs the same code paths with tiny shapes on the CPU (CI: tests/test_gpu_check.py);
there the compile uses the `aot_eager` backend (dynamo + AOTAutograd, no C++ codegen), since
inductor's CPU codegen of even a 2-layer model takes ~50 s on two cores. $GPU_CHECK_COMPILE_BACKEND
or --compile-backend overrides it.

Imports only torch, model/ and app.engine (no pydantic/fastapi): the GPU image has all it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import inspect
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from model.args import ModelArgs
from model.invariance import make_batch_invariant
from model.llama import Transformer

# tests/test_fidelity.py's thresholds for a fast numeric path against float32.
MAX_MEAN_KL = 0.005
MIN_TOP1_PCT = 97.0
# compiled vs eager, float32 with TF32 off: max |diff| <= COMPILE_REL_TOL * max(1, max |logit|).
# Reordered float32 reductions give ~1e-6 relative; a wrong position, mask or stale cache gives O(1).
COMPILE_REL_TOL = 1e-3
# 2 ranks vs 1 process, float32: only the order of the all-reduce's sums differs (~1e-6 relative).
TENSOR_PARALLEL_REL_TOL = 1e-4
DECISIVE_ULPS = 4  # bf16 fidelity: top-1 counted where float32's top-2 margin is >= 4 bf16 ulps (distribution_metrics)
BANDWIDTH_TARGET = 0.75  # issue 17: batch-1 decode reads its weights at >= 75% of the copy bandwidth

LLAMA3_8B = dict(
    dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5
)
QWEN25_05B = dict(
    dim=896,
    n_layers=24,
    n_heads=14,
    n_kv_heads=2,
    hidden_dim=4864,
    vocab_size=151936,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qkv_bias=True,
    tie_word_embeddings=True,
    architecture="qwen2",
)
SMALL = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=768, vocab_size=2048, rope_theta=10000.0)
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=259, rope_theta=10000.0)
TINY_QWEN = dict(TINY, qkv_bias=True, tie_word_embeddings=True, vocab_size=1000, architecture="qwen2")


@dataclass(frozen=True)
class Plan:
    """Every size the check uses: FULL on the GPU, DRY on the CPU (same code paths)."""

    bandwidth_bytes: int
    bandwidth_iters: int
    test_model: dict[str, Any]
    test_seq: int  # the test models' cache length (and the compiled calls' fixed kv_len)
    compile_prompt: int
    compile_steps: int
    batched_lengths: tuple[int, ...]
    batched_new: int
    batched_chunk: int  # the engine's prefill chunk: one prompt is longer
    fidelity_prompts: int
    fidelity_len: int
    fidelity_decode: int
    decode_model: dict[str, Any]
    decode_seq: int
    decode_prompt: int
    decode_steps: int
    decode_compiled_steps: int
    tp_model: dict[str, Any]
    tp_requests: int
    tp_lengths: tuple[int, int]
    tp_batch: int
    budget_s: float  # the whole run; optional parts are skipped when too little is left
    caps: dict[str, float] = field(default_factory=dict)  # per-section wall caps (bounded loops)


FULL = Plan(
    bandwidth_bytes=2 << 30,
    bandwidth_iters=20,
    test_model=SMALL,
    test_seq=256,
    compile_prompt=48,
    compile_steps=8,
    batched_lengths=(5, 12, 40, 71, 23, 9, 130, 64),
    batched_new=32,
    batched_chunk=64,
    fidelity_prompts=4,
    fidelity_len=192,
    fidelity_decode=128,
    decode_model=LLAMA3_8B,
    decode_seq=512,
    decode_prompt=32,
    decode_steps=64,
    decode_compiled_steps=256,
    tp_model=QWEN25_05B,
    tp_requests=256,
    tp_lengths=(100, 1024),
    tp_batch=128,
    budget_s=420.0,
    caps={"throughput": 180.0, "throughput_min": 60.0, "decode_compiled_min_left": 150.0},
)
DRY = Plan(
    bandwidth_bytes=32 << 20,
    bandwidth_iters=5,
    test_model=TINY,
    test_seq=64,
    compile_prompt=8,
    compile_steps=3,
    batched_lengths=(5, 12, 20, 3),
    batched_new=6,
    batched_chunk=8,
    fidelity_prompts=2,
    fidelity_len=32,
    fidelity_decode=8,
    decode_model=TINY,
    decode_seq=64,
    decode_prompt=8,
    decode_steps=8,
    decode_compiled_steps=8,
    tp_model=TINY_QWEN,
    tp_requests=8,
    tp_lengths=(4, 16),
    tp_batch=4,
    budget_s=120.0,
    caps={"throughput": 60.0, "throughput_min": 30.0, "decode_compiled_min_left": 10.0},
)


# ---------------------------------------------------------------- timing and models


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeviceTimer:
    """Seconds of device work between start() and stop(): CUDA events on CUDA, perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> DeviceTimer:
        sync(self.device)
        if self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self._events[1].record()
            self._events[1].synchronize()
            self.seconds = self._events[0].elapsed_time(self._events[1]) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t0


@torch.no_grad()
def randomize(model: Transformer, seed: int, head_gain: float = 4.0) -> None:
    """Random weights in place, on the weights' device and dtype (no float32 copy on the CPU).

    Linear weights N(0, 1/fan_in) keep the residual stream's scale through the layers; the untied
    head gets `head_gain` / sqrt(dim), i.e. logits of std ~head_gain: peaked enough that greedy
    decoding is not a string of near-ties. Embeddings N(0, 1) (tied heads: logits of std ~sqrt(dim),
    very peaked), biases N(0, 0.02), norms 1.
    """
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif p.dim() == 1:
            p.normal_(0.0, 0.02, generator=generator)
        elif name == "tok_embeddings.weight":
            p.normal_(0.0, 1.0, generator=generator)
        elif name == "output.weight":
            p.normal_(0.0, head_gain / math.sqrt(p.shape[1]), generator=generator)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=generator)


def build_model(
    shape: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    *,
    max_batch_size: int,
    max_seq_len: int,
    seed: int = 0,
    batch_invariant: bool = False,
) -> Transformer:
    """A random-weight Transformer made directly on `device` in `dtype`: built on the meta device,
    then `to_empty` + in-place random fill, so an 8B model never exists in float32 or on the CPU."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(**shape))
    model = model.to(dtype=dtype).to_empty(device=device)
    randomize(model, seed)
    if batch_invariant:
        make_batch_invariant(model)
    model.eval().setup_cache(max_batch_size, max_seq_len, batch_invariant=batch_invariant)
    return model


def as_dtype(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A copy of `model` in `dtype` with its own fresh cache (same weights, rounded)."""
    other = copy.deepcopy(model).to(dtype=dtype)
    other.setup_cache(model.max_batch_size, model.max_seq_len, batch_invariant=model.batch_invariant)
    return other


def compiled_forward(model: Transformer, backend: str = "inductor") -> tuple[Callable[..., torch.Tensor], str]:
    """The compiled static-shape step (same signature as Transformer.forward) and what it is.

    The project's own (model/static_step.py's StaticStep) when it exists; else torch.compile with
    CUDA graphs ("reduce-overhead") on CUDA and the default mode elsewhere, dynamic=False (callers
    keep shapes fixed: same batch, same T, same kv_len every call).
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh cache per model: earlier models' entries count toward the recompile limit
    counters.clear()  # dynamo_counters() then describes this model's compile alone
    try:
        from model.static_step import StaticStep  # type: ignore[import-not-found]
    except ImportError:
        StaticStep = None
    if StaticStep is not None:
        kwargs: dict[str, Any] = {"compile": True}
        if "backend" in inspect.signature(StaticStep).parameters:
            kwargs["backend"] = backend
        return StaticStep(model, **kwargs), f"model.static_step.StaticStep({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    cuda = model.device.type == "cuda"
    if backend == "inductor":
        mode = "reduce-overhead" if cuda else "default"
        return torch.compile(model, mode=mode, dynamic=False), f"torch.compile(mode={mode!r}, dynamic=False)"
    return torch.compile(model, backend=backend, dynamic=False), f"torch.compile(backend={backend!r}, dynamic=False)"


def step_begin() -> None:
    """Tell CUDA-graph trees a new step begins (earlier outputs may be overwritten)."""
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()


def dynamo_counters() -> dict[str, Any]:
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
    }


# ---------------------------------------------------------------- comparisons (pure: the tests break them on purpose)


def compare_logits(reference: torch.Tensor, other: torch.Tensor, rel_tol: float = COMPILE_REL_TOL) -> dict[str, Any]:
    """max |diff| against a tolerance relative to the logits' scale; argmax agreement reported."""
    reference, other = reference.float(), other.float()
    scale = max(1.0, float(reference.abs().max()))
    diff = float((reference - other).abs().max()) if reference.shape == other.shape else math.inf
    finite = bool(torch.isfinite(other).all())
    same_top1 = reference.shape == other.shape and bool((reference.argmax(-1) == other.argmax(-1)).all())
    return {
        "max_abs_diff": diff,
        "tolerance": rel_tol * scale,
        "same_argmax": same_top1,
        "passed": finite and diff <= rel_tol * scale,
    }


def compare_tokens(single: list[list[int]], batched: list[list[int]]) -> dict[str, Any]:
    """Each prompt's greedy tokens alone vs in the batch: identical, or where they first differ."""
    mismatches = []
    for i, (a, b) in enumerate(zip(single, batched)):
        if a != b:
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            mismatches.append({"prompt": i, "first_difference": first})
    same_count = len(single) == len(batched)
    return {
        "prompts": len(single),
        "tokens": sum(len(t) for t in single),
        "mismatches": mismatches,
        "passed": same_count and not mismatches and all(len(t) > 0 for t in single),
    }


@torch.no_grad()
def distribution_metrics(reference: torch.Tensor, logits: torch.Tensor, *, mantissa_bits: int = 8) -> dict[str, Any]:
    """KL(reference || logits) per row in float64 and top-1 agreement, both (N, V): bench/fidelity.py's measures.

    Top-1 is also counted over the *decisive* positions alone: those where the reference's top-2
    margin is at least DECISIVE_ULPS units in the last place of its top logit in a format of
    `mantissa_bits` significant bits (bf16: 8). Logits come out of a bf16 model in bf16, so a
    smaller margin is below the output's own resolution and its winner is a coin toss. Random
    weights give Gaussian logits with many such near-ties (on a 2048-token vocabulary: ~21% of
    positions within 4 ulps, and every bf16 flip measured on the CPU had a margin under 2.3 ulps);
    a trained model's next token is rarely that close, which is what tests/test_fidelity.py's
    all-position 97% assumes.
    """
    ref = torch.log_softmax(reference.double(), -1)
    got = torch.log_softmax(logits.double(), -1)
    kl = (ref.exp() * (ref - got)).sum(-1)
    agree = ref.argmax(-1) == got.argmax(-1)
    top2 = reference.double().topk(2, -1).values
    ulp = torch.pow(2.0, torch.floor(torch.log2(top2[:, 0].abs())) - (mantissa_bits - 1))
    decisive = (top2[:, 0] - top2[:, 1]) >= DECISIVE_ULPS * ulp
    return {
        "positions": int(ref.shape[0]),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_pct": 100.0 * float(agree.double().mean()),
        "decisive_positions": int(decisive.sum()),
        "top1_decisive_pct": 100.0 * float(agree[decisive].double().mean()) if bool(decisive.any()) else 0.0,
    }


def fidelity_verdict(metrics: dict[str, Any], max_mean_kl: float = MAX_MEAN_KL, min_top1_pct: float = MIN_TOP1_PCT) -> bool:
    """Mean KL under the threshold, top-1 agreement on decisive positions at least the threshold, and
    at least half the positions decisive (else the top-1 check says little)."""
    return (
        math.isfinite(metrics["kl_mean"])
        and metrics["kl_mean"] < max_mean_kl
        and metrics["top1_decisive_pct"] >= min_top1_pct
        and 2 * metrics["decisive_positions"] >= metrics["positions"]
    )


# ---------------------------------------------------------------- sections


def environment(device: torch.device, plan: Plan) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 2),
            l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        )
    else:
        info.update(device_name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    info["copy_bandwidth_gb_s"] = copy_bandwidth(device, plan.bandwidth_bytes, plan.bandwidth_iters) / 1e9
    info["bandwidth_buffer_mib"] = plan.bandwidth_bytes >> 20
    info["passed"] = info["copy_bandwidth_gb_s"] > 0
    return info


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    with DeviceTimer(device) as timer:
        for _ in range(iters):
            dst.copy_(src)
    del src, dst
    return 2.0 * nbytes * iters / timer.seconds


@torch.inference_mode()
def check_compiled(device: torch.device, plan: Plan, backend: str) -> dict[str, Any]:
    """Compiled vs eager float32 logits on one prefill chunk and several 4-row decode steps."""
    model = build_model(plan.test_model, device, torch.float32, max_batch_size=4, max_seq_len=plan.test_seq, seed=1)
    forward, how = compiled_forward(model, backend)
    kv = plan.test_seq  # fixed, so every call has the same shapes
    gen = torch.Generator().manual_seed(11)
    vocab = model.vocab_size

    def ids(*shape: int) -> torch.Tensor:
        return torch.randint(0, vocab, shape, generator=gen).to(device)

    lengths = [plan.compile_prompt + 3 * b for b in range(4)]
    for slot in range(1, 4):  # the other rows' prompts, eager only (their shapes are not compiled)
        model(
            ids(1, lengths[slot]),
            torch.arange(lengths[slot], device=device)[None],
            torch.tensor([slot], device=device),
            kv_len=kv,
        )
    prompt = ids(1, lengths[0])
    positions = torch.arange(lengths[0], device=device)[None]
    slot0 = torch.tensor([0], device=device)
    t0 = time.perf_counter()
    eager = model(prompt, positions, slot0, kv_len=kv).clone()
    step_begin()
    compiled = forward(prompt, positions, slot0, kv_len=kv).clone()
    prefill = compare_logits(eager, compiled)
    steps = []
    tokens = eager.argmax(-1).repeat(4)[:, None]
    pos = torch.tensor(lengths, device=device)[:, None]
    for _ in range(plan.compile_steps):
        eager = model(tokens, pos, None, kv_len=kv).clone()
        step_begin()
        compiled = forward(tokens, pos, None, kv_len=kv).clone()
        steps.append(compare_logits(eager, compiled))
        tokens, pos = eager.argmax(-1)[:, None], pos + 1
    sync(device)
    decode = {
        "steps": len(steps),
        "max_abs_diff": max(s["max_abs_diff"] for s in steps),
        "tolerance": min(s["tolerance"] for s in steps),
        "same_argmax": all(s["same_argmax"] for s in steps),
        "passed": all(s["passed"] for s in steps),
    }
    return {
        "compiled_with": how,
        "compile_and_run_s": time.perf_counter() - t0,
        "prefill": prefill,
        "decode": decode,
        "dynamo": dynamo_counters(),
        "passed": prefill["passed"] and decode["passed"],
    }


def check_batched(device: torch.device, plan: Plan) -> dict[str, Any]:
    """Greedy tokens through the engine: each prompt alone, then all in one batch; both invariance modes."""
    from app.engine import Engine, GenerationRequest
    from model.sampling import SamplingParams
    from model.tokenizer import ByteTokenizer

    rng = random.Random(5)
    vocab = plan.test_model["vocab_size"]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in plan.batched_lengths]
    n_new = plan.batched_new
    max_seq = max(plan.batched_lengths) + n_new + 1
    greedy = SamplingParams(temperature=0)

    async def generate(engine: Engine, together: bool) -> list[list[int]]:
        def request(p: list[int]) -> GenerationRequest:
            return GenerationRequest(p, greedy, max_tokens=n_new, min_tokens=n_new, ignore_eos=True)

        async def collect(handle: Any) -> list[int]:
            return [t async for out in handle for t in out.token_ids]

        if together:
            handles = [engine.submit(request(p)) for p in prompts]
            return [await collect(h) for h in handles]
        return [await collect(engine.submit(request(p))) for p in prompts]

    result: dict[str, Any] = {"prompt_lengths": list(plan.batched_lengths), "new_tokens": n_new, "dtype": "float32"}
    for invariant in (True, False):
        model = build_model(
            plan.test_model,
            device,
            torch.float32,
            max_batch_size=len(prompts),
            max_seq_len=max_seq,
            seed=2,
            batch_invariant=invariant,
        )
        engine = Engine(
            model,
            ByteTokenizer(),
            max_batch_size=len(prompts),
            max_seq_len=max_seq,
            prefill_chunk=plan.batched_chunk,
        )
        engine.start()
        try:
            single = asyncio.run(generate(engine, together=False))
            batched = asyncio.run(generate(engine, together=True))
            batch_sizes = max(engine.step_batch_sizes)
        finally:
            engine.shutdown()
        entry = compare_tokens(single, batched)
        entry["largest_batch"] = batch_sizes
        entry["passed"] = entry["passed"] and batch_sizes == len(prompts)
        result["batch_invariant" if invariant else "fast"] = entry
        del model, engine
    result["passed"] = result["batch_invariant"]["passed"] and result["fast"]["passed"]
    return result


@torch.inference_mode()
def check_bf16(device: torch.device, plan: Plan) -> dict[str, Any]:
    """bfloat16 vs float32 next-token distributions on the same random weights (teacher forcing)."""
    reference = build_model(plan.test_model, device, torch.float32, max_batch_size=1, max_seq_len=plan.fidelity_len, seed=3)
    half = as_dtype(reference, torch.bfloat16)
    gen = torch.Generator().manual_seed(13)
    vocab, n = reference.vocab_size, plan.fidelity_len
    slot = torch.tensor([0], device=device)
    refs, gots = [], []
    ref0: torch.Tensor | None = None
    for _ in range(plan.fidelity_prompts):
        tokens = torch.randint(0, vocab, (1, n), generator=gen).to(device)
        positions = torch.arange(n, device=device)[None]
        ref = reference(tokens, positions, slot, all_logits=True)[0]
        refs.append(ref)
        gots.append(half(tokens, positions, slot, all_logits=True)[0])
        if ref0 is None:
            ref0, tokens0 = ref, tokens
    prefill = distribution_metrics(torch.cat(refs), torch.cat(gots))
    decoded = [half(tokens0[:, i : i + 1], torch.tensor([[i]], device=device), slot) for i in range(plan.fidelity_decode)]
    assert ref0 is not None
    decode = distribution_metrics(ref0[: plan.fidelity_decode], torch.cat(decoded))
    prefill["passed"], decode["passed"] = fidelity_verdict(prefill), fidelity_verdict(decode)
    return {
        "thresholds": {"max_mean_kl": MAX_MEAN_KL, "min_top1_decisive_pct": MIN_TOP1_PCT, "decisive_ulps": DECISIVE_ULPS},
        "prefill": prefill,
        "decode": decode,
        "passed": prefill["passed"] and decode["passed"],
    }


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode token reads: all parameters but an untied embedding table (one row of it is read)."""
    total = 0
    for name, p in model.named_parameters():
        if name == "tok_embeddings.weight" and model.output is not None:
            continue
        total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def decode_rate(
    forward: Callable[..., torch.Tensor], model: Transformer, device: torch.device, prompt_len: int, warmup: int, steps: int
) -> dict[str, float]:
    """Batch-1 greedy decode after a prompt: tok/s over `steps` steps (after `warmup`), fixed kv_len."""
    kv = model.max_seq_len
    if prompt_len + warmup + steps > kv:
        raise ValueError(f"prompt {prompt_len} + {warmup} + {steps} steps exceed the cache ({kv})")
    prompt = torch.randint(0, model.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(17)).to(device)
    logits = model(prompt, torch.arange(prompt_len, device=device)[None], kv_len=kv)  # eager prefill
    token = logits.argmax(-1, keepdim=True)
    pos = torch.tensor([[prompt_len]], device=device)
    for _ in range(warmup):
        step_begin()
        token, pos = forward(token, pos, None, kv_len=kv).argmax(-1, keepdim=True), pos + 1
    with DeviceTimer(device) as timer:
        for _ in range(steps):
            step_begin()
            token, pos = forward(token, pos, None, kv_len=kv).argmax(-1, keepdim=True), pos + 1
    return {
        "steps": steps,
        "seconds": timer.seconds,
        "tok_s": steps / timer.seconds,
        "ms_per_token": 1000 * timer.seconds / steps,
    }


def measure_decode(
    device: torch.device, plan: Plan, dtype: torch.dtype, bandwidth: float, backend: str, left: Callable[[], float]
) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = build_model(plan.decode_model, device, dtype, max_batch_size=1, max_seq_len=plan.decode_seq, seed=4)
    sync(device)
    per_token = weight_bytes_per_token(model)
    args = model.args
    kv_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * plan.decode_seq * torch.finfo(dtype).bits // 8
    result: dict[str, Any] = {
        "shape": plan.decode_model,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes_per_token": per_token,
        "kv_bytes_per_token": kv_bytes,  # keys/values read at the fixed kv_len (not counted in the fraction)
        "kv_len": plan.decode_seq,
        "build_s": time.perf_counter() - t0,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "target_fraction": BANDWIDTH_TARGET,
    }
    if device.type == "cuda":
        result["memory_allocated_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)

    def summarise(rate: dict[str, float]) -> dict[str, Any]:
        fraction = per_token * rate["tok_s"] / bandwidth
        return {**rate, "bandwidth_fraction": fraction, "meets_target": fraction >= BANDWIDTH_TARGET}

    result["eager"] = summarise(decode_rate(model, model, device, plan.decode_prompt, 4, plan.decode_steps))
    if left() < plan.caps["decode_compiled_min_left"]:
        result["compiled"] = {"skipped": f"only {left():.0f} s of the budget left"}
    else:
        t1 = time.perf_counter()
        forward, how = compiled_forward(model, backend)
        rate = decode_rate(forward, model, device, plan.decode_prompt, 3, plan.decode_compiled_steps)
        result["compiled"] = {
            "compiled_with": how,
            "compile_and_run_s": time.perf_counter() - t1,
            **summarise(rate),
            "dynamo": dynamo_counters(),
        }
    best = max(
        (r for r in (result["eager"], result["compiled"]) if "bandwidth_fraction" in r), key=lambda r: r["bandwidth_fraction"]
    )
    result["best_bandwidth_fraction"] = best["bandwidth_fraction"]
    result["meets_target"] = best["meets_target"]
    result["passed"] = result["eager"]["tok_s"] > 0 and math.isfinite(best["bandwidth_fraction"])
    return result


def measure_throughput(device: torch.device, plan: Plan, dtype: torch.dtype, cap: float) -> dict[str, Any]:
    """Aggregate output tok/s of many requests through the engine (all submitted at once, EOS ignored)."""
    from app.engine import Engine, GenerationRequest
    from model.sampling import SamplingParams
    from model.tokenizer import ByteTokenizer

    rng = random.Random(1234)
    low, high = plan.tp_lengths
    vocab = plan.tp_model["vocab_size"]
    shapes = [(rng.randint(low, high), rng.randint(low, high)) for _ in range(plan.tp_requests)]
    prompts = [[rng.randrange(vocab) for _ in range(p)] for p, _ in shapes]
    max_seq = 2 * high
    t0 = time.perf_counter()
    model = build_model(plan.tp_model, device, dtype, max_batch_size=plan.tp_batch, max_seq_len=max_seq, seed=6)
    engine = Engine(model, ByteTokenizer(), max_batch_size=plan.tp_batch, max_seq_len=max_seq, max_queue=plan.tp_requests + 8)
    greedy = SamplingParams(temperature=0)
    build_s = time.perf_counter() - t0

    def request(prompt: list[int], n: int) -> GenerationRequest:
        return GenerationRequest(prompt, greedy, max_tokens=n, min_tokens=n, ignore_eos=True)

    async def drain(handle: Any) -> int:
        count = 0
        async for out in handle:
            count += len(out.token_ids)
        return count

    async def run(batch: list[tuple[list[int], int]], timeout: float) -> tuple[list[int], bool]:
        tasks = [asyncio.ensure_future(drain(engine.submit(request(p, n)))) for p, n in batch]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return [t.result() for t in tasks if t in done], bool(pending)

    engine.start()
    try:
        asyncio.run(run([(prompts[i][:8], 4) for i in range(2)], cap))  # warm-up: CUDA context, kernels
        stats0 = engine.stats()
        start = time.perf_counter()
        finished, timed_out = asyncio.run(run(list(zip(prompts, [n for _, n in shapes])), cap))
        sync(device)
        seconds = time.perf_counter() - start
        stats1 = engine.stats()
        sizes = list(engine.step_batch_sizes)
    finally:
        engine.shutdown()
    generated = stats1.generated_tokens_total - stats0.generated_tokens_total
    prompt_tokens = stats1.prompt_tokens_total - stats0.prompt_tokens_total
    steps = stats1.steps - stats0.steps
    expected = sum(n for _, n in shapes)
    return {
        "shape": plan.tp_model,
        "dtype": str(dtype).removeprefix("torch."),
        "requests": plan.tp_requests,
        "lengths": list(plan.tp_lengths),
        "max_batch_size": plan.tp_batch,
        "max_seq_len": max_seq,
        "build_s": build_s,
        "seconds": seconds,
        "timed_out": timed_out,
        "cap_s": cap,
        "completed_requests": len(finished),
        "output_tokens": generated,
        "output_tokens_asked": expected,
        "prompt_tokens": prompt_tokens,
        "output_tok_s": generated / seconds,
        "total_tok_s": (generated + prompt_tokens) / seconds,
        "steps": steps,
        "output_tokens_per_step": generated / max(1, steps),
        "largest_batch": max(sizes, default=0),
        "passed": generated > 0 and (timed_out or (len(finished) == plan.tp_requests and sum(finished) == expected)),
    }


# ---------------------------------------------------------------- driver


def check_tensor_parallel(device: torch.device, plan: Plan) -> dict[str, Any]:
    """2 ranks (NCCL, one GPU each; gloo in the dry run) against one process: float32 logits of a
    prefill and a decode step, and greedy tokens through the engine. Needs 2 GPUs on CUDA."""
    from bench.ranks import run_ranks

    world = 2
    if device.type == "cuda" and torch.cuda.device_count() < world:
        return {"passed": True, "skipped": f"needs {world} GPUs, found {torch.cuda.device_count()}"}
    result = run_ranks(world, tensor_parallel_rank, device.type, plan.test_model, plan.test_seq, timeout=300)[0]
    result["passed"] = (
        result["prefill"]["passed"] and result["decode"]["passed"] and result["tokens"]["passed"] and result["ranks"] == world
    )
    return result


def tensor_parallel_rank(
    rank: int, world: int, address: str, device_type: str, shape: dict[str, Any], seq: int
) -> dict[str, Any]:
    """One rank of check_tensor_parallel (bench/ranks.run_ranks runs it): every rank builds the same
    random weights, takes its shard (model.checkpoint.assemble_model), and rank 0 compares."""
    import torch.distributed as dist

    from app.engine import Engine, GenerationRequest
    from model.checkpoint import assemble_model
    from model.sampling import SamplingParams
    from model.tensor_parallel import ParallelLeader, device_for_rank, follow, init_group
    from model.tokenizer import ByteTokenizer

    device = device_for_rank(device_type, rank)
    init_group(rank, world, device, address)
    args = ModelArgs(**shape, max_batch_size=4, max_seq_len=seq)

    def weights() -> dict[str, torch.Tensor]:
        with torch.device("meta"):
            full = Transformer(args)
        full = full.to_empty(device="cpu")
        randomize(full, seed=7)
        return {name: t.detach() for name, t in full.state_dict().items()}

    def assemble(parallel: tuple[int, int] | None) -> Transformer:
        return assemble_model(
            args, weights(), device=device, dtype=torch.float32, source=Path("random"), tensor_parallel=parallel
        )

    shard = assemble((rank, world))
    if rank:
        follow(shard)
        return {}
    leader, single = ParallelLeader(shard), assemble(None)
    rng = random.Random(11)
    prompt = torch.tensor([[rng.randrange(args.vocab_size) for _ in range(min(24, seq - 2))]], device=device)
    positions = torch.arange(prompt.shape[1], device=device)[None]
    prefill = [m(prompt, positions, None, kv_len=prompt.shape[1], all_logits=True) for m in (single, leader)]
    step = torch.tensor([[3], [5]], device=device)
    at = torch.tensor([[prompt.shape[1]], [0]], device=device)
    decode = [m(step, at, torch.tensor([0, 2], device=device), kv_len=prompt.shape[1] + 1) for m in (single, leader)]

    def greedy(model: Any) -> list[list[int]]:
        engine = Engine(model, ByteTokenizer(), max_batch_size=4, max_seq_len=seq, prefill_chunk=8)
        engine.start()
        try:

            async def run() -> list[list[int]]:
                async def one(p: list[int]) -> list[int]:
                    request = GenerationRequest(p, SamplingParams(temperature=0), max_tokens=8, ignore_eos=True)
                    return [t async for out in engine.submit(request) for t in out.token_ids]

                return list(await asyncio.gather(*(one(p) for p in ([1, 2, 3], list(range(5, 25)), [9] * 11))))

            return asyncio.run(run())
        finally:
            engine.shutdown()

    tokens = compare_tokens(greedy(single), greedy(leader))
    leader.stop()
    return {
        "ranks": world,
        "backend": dist.get_backend(),
        "prefill": compare_logits(prefill[0].cpu(), prefill[1].cpu(), TENSOR_PARALLEL_REL_TOL),
        "decode": compare_logits(decode[0].cpu(), decode[1].cpu(), TENSOR_PARALLEL_REL_TOL),
        "tokens": tokens,
    }


TESTS = ("compiled_vs_eager", "batched_vs_single", "bf16_fidelity", "tensor_parallel")
MEASUREMENTS = ("decode_8b", "throughput")


def run_section(report: dict[str, Any], group: str, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    print(f"== {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' results
        result = {"passed": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        print(result["traceback"], file=sys.stderr)
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    report[group][name] = result
    state = "ok" if result.get("passed") else "FAILED"
    print(f"== {name}: {state} in {result['elapsed_s']:.1f} s", flush=True)


def exit_code(report: dict[str, Any]) -> int:
    """0 when the environment, every test and every measurement section passed (targets are reported, not required)."""
    sections = [report["environment"], *report["tests"].values(), *report["measurements"].values()]
    return 0 if sections and all(s.get("passed") for s in sections) else 1


def summary(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"device: {env.get('device_name')} ({env.get('device_type')}), torch {env.get('torch')}, "
        f"copy bandwidth {env.get('copy_bandwidth_gb_s', float('nan')):.0f} GB/s",
        f"{'section':<20} {'result':<8} {'seconds':>8}  numbers",
    ]
    tests = report["tests"]
    for name in TESTS:
        r = tests.get(name, {})
        if "error" in r:
            numbers = r["error"][:90]
        elif name == "compiled_vs_eager":
            diffs = f"prefill {r['prefill']['max_abs_diff']:.2e}, decode {r['decode']['max_abs_diff']:.2e}"
            numbers = f"max |diff| {diffs} ({r['compiled_with']})"
        elif name == "batched_vs_single":
            numbers = f"mismatches invariant {len(r['batch_invariant']['mismatches'])}, fast {len(r['fast']['mismatches'])}"
        elif name == "tensor_parallel":
            numbers = r.get("skipped") or (
                f"{r['ranks']} ranks ({r['backend']}): max |diff| prefill {r['prefill']['max_abs_diff']:.2e}, "
                f"decode {r['decode']['max_abs_diff']:.2e}, token mismatches {len(r['tokens']['mismatches'])}"
            )
        else:
            numbers = (
                f"mean KL prefill {r['prefill']['kl_mean']:.1e} decode {r['decode']['kl_mean']:.1e}, "
                f"top-1 decisive {r['prefill']['top1_decisive_pct']:.1f}% / {r['decode']['top1_decisive_pct']:.1f}%"
            )
        lines.append(f"{name:<20} {'ok' if r.get('passed') else 'FAILED':<8} {r.get('elapsed_s', 0):>8.1f}  {numbers}")
    meas = report["measurements"]
    d = meas.get("decode_8b", {})
    if "error" in d or not d:
        numbers = d.get("error", "not run")[:90]
    else:
        parts = [f"eager {d['eager']['tok_s']:.1f} tok/s ({d['eager']['bandwidth_fraction']:.1%})"]
        c = d["compiled"]
        parts.append(
            f"compiled {c['tok_s']:.1f} tok/s ({c['bandwidth_fraction']:.1%})" if "tok_s" in c else f"compiled {c['skipped']}"
        )
        verdict = "met" if d["meets_target"] else "NOT met"
        parts.append(
            f"target {BANDWIDTH_TARGET:.0%}: {verdict}" + (" (dry run: meaningless)" if report["meta"]["dry_run"] else "")
        )
        numbers = ", ".join(parts)
    lines.append(f"{'decode_8b':<20} {'ok' if d.get('passed') else 'FAILED':<8} {d.get('elapsed_s', 0):>8.1f}  {numbers}")
    t = meas.get("throughput", {})
    if "error" in t or not t:
        numbers = t.get("error", "not run")[:90]
    else:
        numbers = (
            f"{t['output_tok_s']:.0f} output tok/s, {t['requests']} requests, {t['output_tokens']} tokens in {t['seconds']:.1f} s"
            + (" (TIMED OUT: partial)" if t["timed_out"] else "")
        )
    lines.append(f"{'throughput':<20} {'ok' if t.get('passed') else 'FAILED':<8} {t.get('elapsed_s', 0):>8.1f}  {numbers}")
    lines.append(f"total {report['meta']['elapsed_s']:.1f} s: {'PASSED' if exit_code(report) == 0 else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (the same code paths)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cpu with --dry-run, else cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; aot_eager on the CPU)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (optional parts skipped past it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --dry-run (or --device cpu)")
    plan = DRY if args.dry_run else FULL
    backend = (
        args.compile_backend
        or os.environ.get("GPU_CHECK_COMPILE_BACKEND")
        or ("inductor" if device.type == "cuda" else "aot_eager")
    )
    budget = args.budget or plan.budget_s
    start = time.perf_counter()

    def left() -> float:
        return budget - (time.perf_counter() - start)

    if device.type == "cuda":  # float32 means float32 in the tests
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:  # the CPU's graph breaks (Transformer.check_inputs reads CPU positions) are expected noise
        import logging

        torch._logging.set_logs(dynamo=logging.ERROR)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    dtype = torch.bfloat16

    report: dict[str, Any] = {
        "meta": {
            "dry_run": args.dry_run,
            "device": str(device),
            "compile_backend": backend,
            "plan": asdict(plan),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "environment": {},
        "tests": {},
        "measurements": {},
    }
    print("== environment ...", flush=True)
    t0 = time.perf_counter()
    report["environment"] = environment(device, plan)
    report["environment"]["elapsed_s"] = round(time.perf_counter() - t0, 2)
    print(f"== environment: {report['environment']['copy_bandwidth_gb_s']:.0f} GB/s copy bandwidth", flush=True)
    bandwidth = report["environment"]["copy_bandwidth_gb_s"] * 1e9

    run_section(report, "tests", "compiled_vs_eager", lambda: check_compiled(device, plan, backend))
    run_section(report, "tests", "batched_vs_single", lambda: check_batched(device, plan))
    run_section(report, "tests", "bf16_fidelity", lambda: check_bf16(device, plan))
    run_section(report, "tests", "tensor_parallel", lambda: check_tensor_parallel(device, plan))
    run_section(report, "measurements", "decode_8b", lambda: measure_decode(device, plan, dtype, bandwidth, backend, left))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cap = min(plan.caps["throughput"], max(plan.caps["throughput_min"], left()))  # the budget's rest, within limits
    run_section(report, "measurements", "throughput", lambda: measure_throughput(device, plan, dtype, cap))

    report["meta"]["elapsed_s"] = round(time.perf_counter() - start, 2)
    report["passed"] = exit_code(report) == 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report))
    print(f"wrote {args.out}")
    return exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
