"""Shared fixtures: a tiny random-weight Llama with a byte tokenizer (fast), and the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model.args import ModelArgs
from model.llama import Transformer
from model.tokenizer import ByteTokenizer

torch.set_num_threads(int(os.environ.get("LLAMASERVE_TEST_THREADS", "2")))


def tiny_args(**overrides) -> ModelArgs:  # type: ignore[no-untyped-def]
    values = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259, hidden_dim=128, rope_theta=10000.0)
    values.update(overrides)
    return ModelArgs(**values)


def tiny_model(max_batch_size: int = 4, max_seq_len: int = 128, seed: int = 0, **overrides) -> Transformer:  # type: ignore[no-untyped-def]
    """A random-weight model whose logits are peaked enough for greedy decoding to be non-trivial."""
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.fill_(1.0)
    model.eval().setup_cache(max_batch_size, max_seq_len)
    return model


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


def default_model_path() -> Path:
    """Where `python -m model.fetch` puts SmolLM2 (tests that need it fail with a clear message if absent)."""
    cache = Path(os.environ.get("LLAMASERVE_CACHE_DIR", Path.home() / ".cache" / "llamaserve"))
    return cache / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = default_model_path()
    if not path.exists():
        pytest.fail(f"default model missing at {path}: run `python -m model.fetch` first")
    return path
