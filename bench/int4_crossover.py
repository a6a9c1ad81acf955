"""Int4 kernel vs dense float32 GEMM per decode step: where `model/quant.py`'s MAX_ROWS comes from.

Runs every linear layer of a model shape (default SmolLM2-135M: 30 layers of q, k, v, o, gate,
up, down; the output head stays dense and is left out) once per "step" with M rows, through
`Int4Linear` forced to the kernel and through `F.linear` on the dense weights, and prints the
time of each and the ratios; also dense bfloat16 (fast only on CPUs with AVX512-BF16 or AMX). Distinct random
weights per layer, so nothing stays in cache.

    python -m bench.int4_crossover --threads 2 --rows 1 4 8 16 24 32 48 64
    ATEN_CPU_CAPABILITY=avx2 python -m bench.int4_crossover   # what an AVX2-only CPU would get
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.quant import Int4Linear, cpu_capability


def layer_shapes(dim: int, kv_dim: int, hidden: int, layers: int) -> list[tuple[int, int]]:
    """(out, in) of every linear layer, in forward order."""
    per_layer = [(dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim), (hidden, dim), (hidden, dim), (dim, hidden)]
    return per_layer * layers


def best_ms(step: Callable[[], object], repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 24, 32, 48, 64])
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--kv-dim", type=int, default=192)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = [
        Int4Linear(nn.Linear(k, n, bias=False), max_rows=1 << 30)
        for n, k in layer_shapes(args.dim, args.kv_dim, args.hidden, args.layers)
    ]
    print(f"torch {torch.__version__}, CPU capability {cpu_capability()}, {args.threads} threads")
    bf16 = [layer.weight.detach().to(torch.bfloat16) for layer in layers]
    print(f"{'rows':>5} {'int4 ms':>9} {'fp32 ms':>9} {'bf16 ms':>9} {'fp32/int4':>10} {'bf16/int4':>10}")
    with torch.inference_mode():
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k) for k in {layer.in_features for layer in layers}}
            int4 = best_ms(lambda inputs=inputs: [layer(inputs[layer.in_features]) for layer in layers], args.repeats)
            dense = best_ms(
                lambda inputs=inputs: [F.linear(inputs[layer.in_features], layer.weight) for layer in layers], args.repeats
            )
            half = best_ms(
                lambda inputs=inputs: [
                    F.linear(inputs[layer.in_features].to(torch.bfloat16), w).float() for layer, w in zip(layers, bf16)
                ],
                args.repeats,
            )
            print(f"{rows:>5} {int4:>9.2f} {dense:>9.2f} {half:>9.2f} {dense / int4:>10.2f} {half / int4:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
