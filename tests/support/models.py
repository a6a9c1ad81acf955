"""Stand-in models for the tests: a tiny random-weight Llama, and a scripted model whose tokens are written down."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from model.args import ModelArgs
from model.llama import Transformer


def tiny_args(**overrides) -> ModelArgs:  # type: ignore[no-untyped-def]
    values: dict[str, Any] = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259, hidden_dim=128, rope_theta=10000.0)
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


class ScriptedModel:
    """Stands in for the Transformer: after position p comes script[p + 1 - prompt_len].

    The scripted token scores 10, `fallback` (if any) 5, all else 0: outside the script the fallback
    comes next, and banning the scripted token (min_tokens) picks it. With prompt_len 0 the script
    holds the prompt too (the token after position p is script[p + 1]).

    Offers the engine's model protocol (max_batch_size, max_seq_len, vocab_size, device, __call__), and
    also args.vocab_size and tok_embeddings.weight.device, which model.llama.Transformer has too.
    """

    def __init__(
        self,
        script: Sequence[int],
        prompt_len: int = 0,
        fallback: int | None = None,
        vocab_size: int = 259,
        max_batch_size: int = 4,
        max_seq_len: int = 128,
    ) -> None:
        self.script, self.prompt_len, self.fallback = list(script), prompt_len, fallback
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.vocab_size = vocab_size
        self.device = torch.device("cpu")
        self.args = SimpleNamespace(vocab_size=vocab_size)
        self.tok_embeddings = SimpleNamespace(weight=torch.zeros(1, device=self.device))

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor | None = None,
        *,
        kv_len: int | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        if self.fallback is not None:
            logits[..., self.fallback] = 5.0
        for b, t in itertools.product(range(tokens.shape[0]), range(tokens.shape[1])):
            i = int(positions[b, t]) + 1 - self.prompt_len
            if 0 <= i < len(self.script):
                logits[b, t, self.script[i]] = 10.0
        return logits if all_logits else logits[:, -1]
