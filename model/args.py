"""Model hyper-parameters: one dataclass for the whole Llama family.

Meta's field names are kept (dim, n_layers, ...) so the network reads like Meta's llama3 model.py;
the extra fields cover the relatives (Qwen2's qkv bias, SmolLM2's tied head, Llama 3.1 rope scaling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


class UnsupportedArchitectureError(ValueError):
    """The checkpoint describes a network this package does not implement."""


@dataclass
class RopeScaling:
    """Llama 3.1 frequency scaling (`rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048
    # Relatives of Llama.
    hidden_dim: int | None = None  # explicit FFN size (HF `intermediate_size`); else Meta's formula
    head_dim: int | None = None  # defaults to dim // n_heads
    qkv_bias: bool = False  # Qwen2
    tie_word_embeddings: bool = False  # SmolLM2, Qwen2-0.5B
    rope_scaling: RopeScaling | None = None  # Llama 3.1
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    context_length: int | None = None  # what the model was trained for, when known
    architecture: str = "llama"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = meta_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @classmethod
    def from_params_json(cls, path: str | Path, **overrides: Any) -> "ModelArgs":
        """Meta's `params.json` (Llama 2 / 3 / 3.1 releases)."""
        params = json.loads(Path(path).read_text())
        scaling = params.pop("use_scaled_rope", False)
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        args = cls(**known, **overrides)
        if scaling and args.rope_scaling is None:
            args.rope_scaling = RopeScaling()
        return args

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, **overrides: Any) -> "ModelArgs":
        """An HF `config.json` of model_type `llama` or `qwen2`."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        model_type = config.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unsupported model_type {model_type!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        scaling = config.get("rope_scaling") or config.get("rope_parameters") or None
        rope_scaling = None
        if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
            rope_scaling = RopeScaling(
                factor=scaling["factor"],
                low_freq_factor=scaling["low_freq_factor"],
                high_freq_factor=scaling["high_freq_factor"],
                original_max_position_embeddings=scaling["original_max_position_embeddings"],
            )
        elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise UnsupportedArchitectureError(f"unsupported rope scaling {scaling!r}: only 'llama3' is")
        rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        values: dict[str, Any] = dict(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=eos_ids[0] if eos_ids else None,
            stop_token_ids=list(eos_ids),
            context_length=config.get("max_position_embeddings"),
            architecture=model_type,
        )
        values.update(overrides)
        return cls(**values)


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule for the SwiGLU width: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
