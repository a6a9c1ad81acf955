"""Our loader + network against transformers, the independent oracle.

Tiny random Llama (GQA, Llama 3.1 rope scaling) and Qwen2 (qkv bias, tied head) saved with
save_pretrained must give transformers' logits; the real SmolLM2 GGUF must give transformers' own
GGUF-loaded logits and greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoint import load_weights
from tests.support.oracle import GOLDEN_PROMPT, TOL, greedy, hf_logits, tiny_hf_llama, tiny_hf_qwen2, transformers_gguf_model


def assert_prefill_and_decode_match(ours: torch.nn.Module, reference, ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    """All prefill logits, then one decode step after the prefill, against a full reference forward."""
    prompt, last = ids[:-1], ids[-1]
    expected = hf_logits(reference, ids)
    got = ours(torch.tensor([prompt]), torch.arange(len(prompt))[None], all_logits=True)[0]
    torch.testing.assert_close(got, expected[:-1], atol=TOL, rtol=0)
    step = ours(torch.tensor([[last]]), torch.tensor([[len(prompt)]]))[0]
    torch.testing.assert_close(step, expected[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("make", [tiny_hf_llama, tiny_hf_qwen2], ids=["llama-gqa-rope-scaling", "qwen2-bias-tied"])
def test_hf_safetensors_matches_transformers(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reference = make()
    reference.save_pretrained(tmp_path)
    loaded = load_weights(tmp_path, max_batch_size=2, max_seq_len=128)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    assert_prefill_and_decode_match(loaded.model, reference, ids)


def test_tied_head_shares_the_embedding(tmp_path: Path) -> None:
    tiny_hf_qwen2().save_pretrained(tmp_path)
    model = load_weights(tmp_path, max_batch_size=1, max_seq_len=16).model
    assert model.output is None
    assert model.args.tie_word_embeddings


def test_rope_scaling_is_exercised(tmp_path: Path) -> None:
    """Guard for the test above: without the scaling, the same weights must disagree with transformers."""
    reference = tiny_hf_llama()
    reference.save_pretrained(tmp_path)
    loaded = load_weights(tmp_path, max_batch_size=1, max_seq_len=128)
    loaded.model.args.rope_scaling = None
    loaded.model.setup_cache(1, 128)
    ids = list(range(3, 100))
    got = loaded.model(torch.tensor([ids]), torch.arange(len(ids))[None], all_logits=True)[0]
    assert (got - hf_logits(reference, ids)).abs().max() > 1e-2


def test_smollm2_gguf_matches_transformers(smollm2_path: Path, tmp_path: Path) -> None:
    """The real model: logits on the golden prompt and 64 greedy tokens, vs transformers' GGUF loader."""
    ours = load_weights(smollm2_path, max_batch_size=1, max_seq_len=256).model
    reference = transformers_gguf_model(smollm2_path)
    expected = hf_logits(reference, GOLDEN_PROMPT)
    got = ours(torch.tensor([GOLDEN_PROMPT]), torch.arange(len(GOLDEN_PROMPT))[None], all_logits=True)[0]
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)

    # Greedy decoding, checked by teacher forcing: transformers reads prompt + our 64 tokens in one
    # forward; its argmax at every step must be our next token (so its own greedy run is identical)
    # and its logits must match the ones we decoded with.
    tokens, step_logits = greedy(ours, GOLDEN_PROMPT, 64)
    reference_steps = hf_logits(reference, GOLDEN_PROMPT + tokens[:-1])[len(GOLDEN_PROMPT) - 1 :]
    assert reference_steps.argmax(-1).tolist() == tokens
    torch.testing.assert_close(step_logits, reference_steps, atol=TOL, rtol=0)
    assert tokens[:8] == [504, 3575, 282, 4649, 314, 7042, 30, 2]  # default-model.md (llama.cpp agrees)
