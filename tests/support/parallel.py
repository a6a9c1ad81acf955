"""The tensor-parallel tests' rank bodies (run by bench/ranks.run_ranks) and the tiny HF checkpoints they load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# ---- tiny checkpoints: the three shapes tensor parallelism must split ------------------------------


def write_tiny_checkpoints(directory: Path) -> dict[str, Path]:
    """HF checkpoints of tiny random models, 259 ids (the ByteTokenizer's) so the engine can run them:
    llama2 (multi-head, 4 heads), llama3 (GQA 6 heads / 3 KV heads: an uneven split over 2 ranks, rope
    scaling) and qwen2 (qkv bias, tied head); and meta, a Llama 3 in Meta's format in 2 shards."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from tests.support.meta_checkpoint import write_meta_checkpoint
    from tests.support.oracle import randomise, tiny_hf_llama

    common: dict[str, Any] = dict(vocab_size=259, num_hidden_layers=2, max_position_embeddings=256)
    models = {
        "llama2": LlamaForCausalLM(
            LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, **common)
        ),
        "llama3": LlamaForCausalLM(
            LlamaConfig(
                hidden_size=96,
                intermediate_size=192,
                num_attention_heads=6,
                num_key_value_heads=3,
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                **common,
            )
        ),
        "qwen2": Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=64,
                intermediate_size=96,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                **common,
            )
        ),
    }
    paths = {}
    for seed, (name, hf_model) in enumerate(models.items()):
        torch.manual_seed(seed)
        randomise(hf_model, seed).save_pretrained(directory / name)
        paths[name] = directory / name
    # Meta's format, one shard per rank (each rank reads its own, as Meta's model.py does)
    paths["meta"] = write_meta_checkpoint(tiny_hf_llama(intermediate=192, scaling_original=8192), directory / "meta", 2, 0)
    return paths


PROMPTS = [[(5 * i + 11 * j) % 256 for j in range(9 + 7 * i)] for i in range(3)]
# The engine's requests: the three prompts, and the longest again, which borrows its first 16-token
# chunk from the other's slot (a prefix copy, broadcast like a forward).
ENGINE_PROMPTS = [*PROMPTS, PROMPTS[2]]


def compare_with_single_process(rank: int, world: int, address: str, paths: dict[str, Path]) -> dict[str, Any] | None:
    """For each checkpoint, on rank 0: the sharded model's logits and greedy engine tokens, and the
    single-process model's (other ranks follow). Float32, batch invariant, as the server runs."""
    from model.checkpoint import load_weights
    from model.invariance import prefill_rows_independent
    from model.tensor_parallel import ParallelLeader, follow, init_group

    init_group(rank, world, "cpu", address)
    results = {}
    for name, path in paths.items():
        # 96 positions: room for the prefix cache's row-independence check (80 tokens), which the engine
        # runs on every rank in step at start-up
        shard = load_weights(path, max_batch_size=4, max_seq_len=96, tensor_parallel=(rank, world)).model
        if rank:
            follow(shard)
            continue
        # A heartbeat every 0.1 s of idleness: it interleaves with the calls below (and fires while rank 0
        # runs the single-process model), so its no-ops and the calls' lock are exercised.
        leader = ParallelLeader(shard, heartbeat_s=0.1)
        single = load_weights(path, max_batch_size=4, max_seq_len=96).model
        rows_independent = leader.prefill_rows_independent(), prefill_rows_independent(single)
        tokens = torch.tensor(PROMPTS[2])[None]
        positions = torch.arange(tokens.shape[1])[None]
        logits = [m(tokens, positions, torch.tensor([1]), kv_len=tokens.shape[1], all_logits=True) for m in (leader, single)]
        # A decode batch of two rows in slots 1 and 3: one at the end of the prompt above, one fresh.
        rows = torch.tensor([[7], [42]])
        at = torch.tensor([[tokens.shape[1]], [0]])
        decode = [m(rows, at, torch.tensor([1, 3]), kv_len=tokens.shape[1] + 1) for m in (leader, single)]
        (parallel_tokens, cached), (single_tokens, _) = (_engine_greedy(m) for m in (leader, single))
        leader.stop()
        results[name] = {
            "prefill_error": float((logits[0] - logits[1]).abs().max()),
            "decode_error": float((decode[0] - decode[1]).abs().max()),
            "logit_scale": float(logits[1].abs().max()),
            "parallel_tokens": parallel_tokens,
            "single_tokens": single_tokens,
            "parallel_cached_tokens": cached,
            "rows_independent": rows_independent,
        }
    return results if rank == 0 else None


def _engine_greedy(model: Any) -> tuple[list[list[int]], int]:
    """Greedy tokens of ENGINE_PROMPTS through the engine, all at once (continuous batching, prefix
    cache on), and the prompt tokens the prefix cache supplied."""
    import asyncio

    from app.engine import Engine, GenerationOutput, GenerationRequest
    from model.sampling import SamplingParams
    from model.tokenizer import ByteTokenizer
    from tests.support.engine import ids_of, run

    engine = Engine(model, ByteTokenizer(), max_batch_size=4, max_seq_len=96, prefill_chunk=16)
    engine.start()
    try:

        async def one(prompt: list[int]) -> list[GenerationOutput]:
            handle = engine.submit(GenerationRequest(prompt_ids=prompt, sampling=SamplingParams(temperature=0), max_tokens=12))
            return [output async for output in handle]

        async def generate() -> list[list[GenerationOutput]]:
            return list(await asyncio.gather(*(one(p) for p in ENGINE_PROMPTS)))

        outputs = run(generate())
        return [ids_of(o) for o in outputs], sum(o[-1].num_cached_tokens for o in outputs)
    finally:
        engine.shutdown()
