"""Which grammar engine to build structured outputs on: llguidance vs xgrammar, mask cost per step.

Both engines compute, per constrained row and per step, a bitmask of the tokens the grammar allows
next. This measures that cost on the served model's own vocabulary (default: SmolLM2, 49,152 ids) at
batch 1, 8 and 32, for a JSON Schema and for JSON mode, walking each row through a valid document one
token per step as decoding does. It also times grammar compilation (the cost a request pays before its
first token) and checks that each engine's masks admit every token of the document (a mask that
refused one would be a correctness bug).

    python -m bench.grammar_engines            # engines that are installed (xgrammar is optional)
    python -m bench.grammar_engines --engine   # also: whole engine steps, constrained vs not, batch 1/8/32

`--engine` runs the default model in the engine (no HTTP) on B requests of 64 tokens each, every row
constrained by a regex of lowercase text (it never ends early) against the same requests unconstrained,
alternating, 3 repeats: the cost of constrained decoding per step, masks, bias and matcher updates included.

llguidance is the project's dependency; xgrammar is measured only when installed (`pip install
--no-deps xgrammar apache-tvm-ffi`: its wheel otherwise pulls transformers and triton).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from typing import Any, Callable

from model.fetch import default_model_path
from model.tokenizer import Tokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "status": {"enum": ["active", "inactive", "banned"]},
    },
    "required": ["name", "age", "tags", "address", "status"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["math", "engines", "poetry"],
    "address": {"city": "London", "zip": "12345"},
    "status": "active",
}


def load_tokenizer(path: str) -> Tokenizer:
    from model.gguf_weights import open_reader
    from model.tokenizer.gguf_vocab import tokenizer_from_gguf

    return tokenizer_from_gguf(open_reader(default_model_path() if path == "default" else path))  # type: ignore[arg-type]


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def run_llguidance(tokenizer: Tokenizer, text: str, batch: int, schema: dict[str, Any] | None) -> tuple[float, float, bool]:
    """(compile ms, mask ms per step for the batch, all document tokens allowed)."""
    import llguidance
    import llguidance.torch

    from model.grammar import JSON_OPTIONS, grammar_tokenizer

    lltok = grammar_tokenizer(tokenizer)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema if schema is not None else {"type": "object"}, defaults=JSON_OPTIONS
    )
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(batch)]
    compile_ms = 1000 * (time.perf_counter() - start) / batch
    ids = tokenizer.encode(text)
    mask = llguidance.torch.allocate_token_bitmask(batch, lltok.vocab_size)
    executor = llguidance.LLExecutor(num_threads=1)
    steps, ok = [], True
    for token in ids:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
        steps.append(time.perf_counter() - start)
        ok &= bool((mask[0, token // 32] >> (token % 32)) & 1)
        for m in matchers:
            m.consume_token(token)
    return compile_ms, median_ms(steps), ok and not matchers[0].is_error()


def optional_xgrammar() -> Any:
    """xgrammar if installed, else None: it is the comparison, not a dependency (a clean `.[bench]` runs
    this script without it, measuring llguidance alone)."""
    try:
        return importlib.import_module("xgrammar")
    except ImportError:
        return None


def run_xgrammar(tokenizer: Tokenizer, text: str, batch: int, schema: dict[str, Any] | None) -> tuple[float, float, bool]:
    xgr = optional_xgrammar()

    vocab = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, stop_token_ids=sorted(tokenizer.stop_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    start = time.perf_counter()
    if schema is not None:
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    else:
        compiled = compiler.compile_builtin_json_grammar()
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    compile_ms = 1000 * (time.perf_counter() - start) / batch
    mask = xgr.allocate_token_bitmask(batch, info.vocab_size)
    ids = tokenizer.encode(text)
    steps, ok = [], True
    for token in ids:
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)
        steps.append(time.perf_counter() - start)
        ok &= bool((mask[0, token // 32] >> (token % 32)) & 1)
        for m in matchers:
            m.accept_token(token)
    return compile_ms, median_ms(steps), ok


def engine_step_cost(batches: list[int], output_tokens: int = 64, repeats: int = 3) -> None:
    """Median ms per engine step for B rows, unconstrained vs constrained, and their ratio."""
    import asyncio

    from app.engine import Engine, GenerationRequest
    from bench.engine_throughput import in_thread
    from model.checkpoint import load_model
    from model.grammar import GrammarMatcher, GrammarSpec
    from model.sampling import SamplingParams

    loaded = in_thread(
        lambda: load_model(default_model_path(), max_batch_size=max(batches), max_seq_len=256, quantization="auto")
    )
    spec = GrammarSpec("regex", "[a-z ]{1000}")  # longer than any run: every step is constrained
    vocab = loaded.model.vocab_size

    async def run(engine: Engine, rows: int, constrained: bool) -> float:
        prompt = loaded.tokenizer.encode("Write a long story about the sea.")
        start = time.perf_counter()
        handles = [
            engine.submit(
                GenerationRequest(
                    prompt,
                    SamplingParams(temperature=0.8, seed=i),
                    max_tokens=output_tokens,
                    ignore_eos=True,
                    grammar=GrammarMatcher(spec, loaded.tokenizer, vocab) if constrained else None,
                )
            )
            for i in range(rows)
        ]
        for handle in handles:
            async for _ in handle:
                pass
        return 1000 * (time.perf_counter() - start) / output_tokens

    print(f"\nengine steps ({loaded.quantization}, {output_tokens} tokens per request, median of {repeats})")
    print(f"{'batch':>5} {'plain ms/step':>14} {'constrained ms/step':>20} {'ratio':>6}")
    for rows in batches:
        engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=rows, max_seq_len=256, prefix_cache=False)
        engine.start()
        try:
            asyncio.run(run(engine, rows, True))  # warm-up (first grammar, first shapes)
            plain, constrained = [], []
            for _ in range(repeats):
                plain.append(asyncio.run(run(engine, rows, False)))
                constrained.append(asyncio.run(run(engine, rows, True)))
        finally:
            engine.shutdown()
        p, c = statistics.median(plain), statistics.median(constrained)
        print(f"{rows:>5} {p:>14.1f} {c:>20.1f} {c / p:>6.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="GGUF whose vocabulary to use (default: the default model)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--engine", action="store_true", help="also time whole engine steps, constrained vs not")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    compact = json.dumps(DOCUMENT, separators=(", ", ": "))
    engines: dict[str, Callable[..., tuple[float, float, bool]]] = {"llguidance": run_llguidance}
    if optional_xgrammar() is not None:
        engines["xgrammar"] = run_xgrammar
    else:
        print("xgrammar is not installed: measuring llguidance only")
    print(f"vocabulary {tokenizer.vocab_size}, document {len(tokenizer.encode(compact))} tokens")
    print(f"{'engine':<11} {'grammar':<11} {'batch':>5} {'compile ms/row':>15} {'mask ms/step':>13} {'per row':>8} all-allowed")
    for name, run in engines.items():
        for label, schema in (("json_schema", SCHEMA), ("json_object", None)):
            for batch in (int(b) for b in args.batches.split(",")):
                compile_ms, step_ms, ok = run(tokenizer, compact, batch, schema)
                print(f"{name:<11} {label:<11} {batch:>5} {compile_ms:>15.2f} {step_ms:>13.3f} {step_ms / batch:>8.3f} {ok}")
    if args.engine:
        from model.threads import configure_threads

        configure_threads(2)
        engine_step_cost([int(b) for b in args.batches.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
