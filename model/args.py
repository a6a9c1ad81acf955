"""Model hyper-parameters: one dataclass for the whole Llama family.

Meta's field names are kept (dim, n_layers, ...) so the network reads like Meta's llama3 model.py;
the extra fields cover the relatives (Qwen2's qkv bias, SmolLM2's tied head, Llama 3.1 rope scaling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

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
    n_kv_heads: int = 0  # 0 (or None from a config): n_heads, i.e. no grouped-query attention
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048
    # Relatives of Llama.
    hidden_dim: int = 0  # explicit FFN size (HF `intermediate_size`); 0 (or None): Meta's formula
    head_dim: int = 0  # 0 (or None): dim // n_heads
    qkv_bias: bool = False  # Qwen2
    tie_word_embeddings: bool = False  # SmolLM2, Qwen2-0.5B
    rope_scaling: RopeScaling | None = None  # Llama 3.1
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    context_length: int | None = None  # what the model was trained for, when known
    architecture: str = "llama"

    def __post_init__(self) -> None:
        # The derived sizes are resolved here, once, so every reader sees ints. `not` also catches
        # None: the constructors below build their keyword arguments from JSON / GGUF values.
        if not self.n_kv_heads:
            self.n_kv_heads = self.n_heads
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if not self.hidden_dim:
            self.hidden_dim = meta_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @classmethod
    def from_params_json(cls, path: str | Path, **overrides: Any) -> "ModelArgs":
        """Meta's `params.json` (Llama 2 / 3 / 3.1 releases)."""
        params = json.loads(Path(path).read_text())
        if not isinstance(params, dict):
            raise ValueError("params.json must hold a JSON object")
        scaling = params.pop("use_scaled_rope", False)
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        args = cls(**{**known, **overrides})
        if scaling and args.rope_scaling is None:
            args.rope_scaling = RopeScaling()
        return args

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, **overrides: Any) -> "ModelArgs":
        """An HF `config.json` of model_type `llama` or `qwen2`."""
        if isinstance(config, (str, Path)):
            config = json.loads(Path(config).read_text())
        if not isinstance(config, dict):
            raise ValueError("an HF config must be a JSON object")
        model_type = config.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unsupported model_type {model_type!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(f"unsupported hidden_act {config['hidden_act']!r}: only 'silu' (SwiGLU) is")
        rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        dim, n_heads = required(config, "hidden_size"), required(config, "num_attention_heads")
        values: dict[str, Any] = dict(
            dim=dim,
            n_layers=required(config, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads", n_heads),
            vocab_size=required(config, "vocab_size"),
            hidden_dim=required(config, "intermediate_size"),
            head_dim=config.get("head_dim") or dim // n_heads,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=hf_rope_scaling(config.get("rope_scaling") or config.get("rope_parameters")),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=eos_ids[0] if eos_ids else None,
            stop_token_ids=list(eos_ids),
            context_length=config.get("max_position_embeddings"),
            architecture=model_type,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_gguf_metadata(cls, source: Any, *, tensor_names: Iterable[str] | None = None, **overrides: Any) -> "ModelArgs":
        """GGUF metadata of architecture `llama` or `qwen2`.

        `source` is a `gguf.GGUFReader`, its `.fields`, or a plain {key: value} dict. The head is tied
        when the file has no `output.weight` tensor; pass `tensor_names` when `source` is not a reader.
        """
        fields = getattr(source, "fields", source)
        if tensor_names is None and hasattr(source, "tensors"):
            tensor_names = [t.name for t in source.tensors]
        arch = gguf_value(fields, "general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unsupported GGUF architecture {arch!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def key(name: str, default: Any = _REQUIRED) -> Any:
            return gguf_value(fields, f"{arch}.{name}", default)

        dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", dim // n_heads))
        rotary_dims = int(key("rope.dimension_count", head_dim))
        if rotary_dims != head_dim:
            raise UnsupportedArchitectureError(f"partial rotary embeddings ({rotary_dims} of {head_dim}) are not supported")
        vocab_size = key("vocab_size", None)
        if vocab_size is None:
            vocab_size = gguf_array_len(fields, "tokenizer.ggml.tokens")
        eos = gguf_value(fields, "tokenizer.ggml.eos_token_id", None)
        stops = [gguf_value(fields, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
        values: dict[str, Any] = dict(
            dim=dim,
            n_layers=int(key("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(key("attention.head_count_kv", n_heads)),
            vocab_size=int(vocab_size),
            hidden_dim=int(key("feed_forward_length")),
            head_dim=head_dim,
            norm_eps=round_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=round_f32(key("rope.freq_base", 10000.0)),
            qkv_bias=arch == "qwen2",
            tie_word_embeddings=tensor_names is not None and "output.weight" not in set(tensor_names),
            rope_scaling=gguf_rope_scaling(key),
            bos_token_id=gguf_value(fields, "tokenizer.ggml.bos_token_id", None),
            eos_token_id=eos,
            stop_token_ids=list(dict.fromkeys(int(s) for s in stops if s is not None)),
            context_length=key("context_length", None),
            architecture=arch,
        )
        values.update(overrides)
        return cls(**values)


_REQUIRED = object()


def required(config: dict[str, Any], name: str, where: str = "HF config") -> Any:
    """config[name], or an error naming the missing field (a bare KeyError says too little)."""
    if name not in config:
        raise ValueError(f"{where} lacks the required field {name!r}")
    return config[name]


def hf_rope_scaling(scaling: dict[str, Any] | None) -> RopeScaling | None:
    """HF `rope_scaling` (or transformers 5's `rope_parameters`): none/default, or Llama 3.1's `llama3`."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedArchitectureError(f"unsupported rope scaling {scaling!r}: only 'llama3' is")
    where = "HF rope_scaling"
    return RopeScaling(
        factor=required(scaling, "factor", where),
        low_freq_factor=required(scaling, "low_freq_factor", where),
        high_freq_factor=required(scaling, "high_freq_factor", where),
        original_max_position_embeddings=required(scaling, "original_max_position_embeddings", where),
    )


def gguf_value(fields: Any, name: str, default: Any = _REQUIRED) -> Any:
    """One scalar/string value from GGUF fields (ReaderField or plain value); a missing required key is an error."""
    if name not in fields:
        if default is _REQUIRED:
            raise ValueError(f"GGUF metadata lacks the required key {name!r}")
        return default
    field = fields[name]
    return field.contents() if hasattr(field, "contents") else field


def gguf_array_len(fields: Any, name: str) -> int:
    """Length of a GGUF array without decoding its items (the token list has ~100k strings)."""
    if name not in fields:
        raise ValueError(f"GGUF metadata lacks {name!r} (needed for the vocabulary size)")
    field = fields[name]
    return len(field.data) if hasattr(field, "data") else len(field)


def gguf_rope_scaling(key: Any) -> RopeScaling | None:
    """`{arch}.rope.scaling.*` keys; Llama 3.1 files often carry only a `rope_freqs` tensor (see the loader)."""
    kind = key("rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    if kind != "llama3":
        raise UnsupportedArchitectureError(f"unsupported GGUF rope scaling {kind!r}: only 'llama3' is")
    return RopeScaling(
        factor=float(key("rope.scaling.factor", 8.0)),
        original_max_position_embeddings=int(key("rope.scaling.original_context_length", 8192)),
    )


def round_f32(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06; keep the intended decimal."""
    return float(f"{float(value):.7g}")


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule for the SwiGLU width: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
