"""Independent oracles on the tiny model: full-recompute greedy decoding, prompt logprobs, a float64 log-softmax."""

from __future__ import annotations

import functools

import numpy as np
import torch

from model.llama import Transformer
from tests.support.models import tiny_model


@functools.lru_cache(maxsize=2)
def reference_model(seed: int = 0) -> Transformer:
    """A separate copy of the tiny model (the same weights for the same seed), one slot, built once per seed."""
    return tiny_model(max_batch_size=1, max_seq_len=128, seed=seed)


@torch.no_grad()
def reference_greedy_logprobs(prompt: list[int], max_tokens: int, seed: int = 0) -> tuple[list[int], list[float]]:
    """Greedy decoding by re-running the whole sequence every step: no engine, no slots, no batching, no
    incremental cache reuse. Returns the ids and each one's logprob."""
    model = reference_model(seed)
    tokens, logprobs = list(prompt), []
    for _ in range(max_tokens):
        logits = model(torch.tensor([tokens]), torch.arange(len(tokens))[None])[0].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
    return tokens[len(prompt) :], logprobs


def reference_greedy(prompt: list[int], max_tokens: int, seed: int = 0) -> list[int]:
    """The ids of reference_greedy_logprobs."""
    return reference_greedy_logprobs(prompt, max_tokens, seed)[0]


@torch.no_grad()
def reference_prompt_logprobs(prompt: list[int], seed: int = 0) -> list[float]:
    """logprob of prompt[k] given prompt[:k], k >= 1, from one full forward pass."""
    model = reference_model(seed)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], all_logits=True)[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [float(lp[k - 1, prompt[k]]) for k in range(1, len(prompt))]


def logsoftmax_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
