"""Shared fixtures: a byte tokenizer, the real default model's path, and the anyio backend (helpers live in tests/support)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model.tokenizer import ByteTokenizer

torch.set_num_threads(int(os.environ.get("LLAMASERVE_TEST_THREADS", "2")))


@pytest.fixture
def anyio_backend() -> str:
    """anyio tests (pytest.mark.anyio) run on asyncio only."""
    return "asyncio"


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
