"""Load a checkpoint (Meta `.pth`, HF safetensors or GGUF) into a ready-to-run `Transformer`.

Every format becomes one state dict in our names (Meta's) and the rotate_half rotary layout; the
network is built on the meta device and takes the tensors with `assign=True`, so weights are
never held twice. A tied head reuses the embedding tensor.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from model import fetch, gguf_weights, quant
from model.args import ModelArgs, UnsupportedArchitectureError, gguf_value
from model.errors import CheckpointError  # re-exported: callers import it from here
from model.invariance import make_batch_invariant
from model.llama import Transformer
from model.tokenizer import Tokenizer, tokenizer_from_dir, tokenizer_from_gguf

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = (
    "a .gguf file (llama, qwen2)",
    "a directory with params.json + consolidated.*.pth (Meta)",
    "a directory with config.json + *.safetensors (HF llama, qwen2)",
)


@dataclass
class LoadedModel:
    model: Transformer  # cache already set up
    tokenizer: Tokenizer
    args: ModelArgs
    name: str  # served model id, e.g. "SmolLM2-135M-Instruct"
    chat_template: str | None  # raw template text from GGUF / tokenizer_config.json, if any
    quantization: str = "none"  # what `auto` resolved to: none or int4


@dataclass
class LoadedWeights:
    """Everything but the tokenizer: what tests of the weights alone need."""

    model: Transformer
    args: ModelArgs
    name: str
    chat_template: str | None
    gguf_reader: Any = None  # kept for the tokenizer, GGUF only
    quantization: str = "none"  # what `auto` resolved to


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_batch_size: int = 8,
    max_seq_len: int = 2048,
    cache_dir: str | Path | None = None,
    cache_weights: bool = True,
    quantization: str = "none",
    batch_invariant: bool = True,
) -> LoadedModel:
    """Model + tokenizer + name + chat template from a checkpoint path (format detected).

    max_seq_len is clamped to the trained context length when that is known and smaller.
    GGUF weights are cached as fp32 safetensors under cache_dir (default: $LLAMASERVE_CACHE_DIR or
    ~/.cache/llamaserve) unless cache_weights is False. quantization: none, int4 (CPU, see
    model/quant.py) or auto (int4 for a Q4_1 GGUF on a CPU that has the int4 kernel).
    batch_invariant: a row's numbers never depend on the rest of its batch (model/invariance.py).
    """
    path = Path(path)
    weights = load_weights(
        path, device=device, dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
        cache_dir=cache_dir, cache_weights=cache_weights, quantization=quantization, batch_invariant=batch_invariant,
    )
    try:
        if weights.gguf_reader is not None:
            tokenizer = tokenizer_from_gguf(weights.gguf_reader)
        else:
            tokenizer = tokenizer_from_dir(path)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer: {e}") from e
    if tokenizer.vocab_size > weights.args.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.vocab_size} ids but the embedding only {weights.args.vocab_size}"
        )
    return LoadedModel(weights.model, tokenizer, weights.args, weights.name, weights.chat_template, weights.quantization)


def load_weights(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_batch_size: int = 8,
    max_seq_len: int = 2048,
    cache_dir: str | Path | None = None,
    cache_weights: bool = True,
    quantization: str = "none",
    batch_invariant: bool = True,
) -> LoadedWeights:
    """The network with its weights and KV cache, without the tokenizer."""
    path = Path(path)
    if max_batch_size < 1 or max_seq_len < 1:
        raise CheckpointError(f"max_batch_size ({max_batch_size}) and max_seq_len ({max_seq_len}) must be >= 1")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; expected one of: {'; '.join(SUPPORTED_FORMATS)}")
    if quantization != "auto":  # a request that cannot run fails before the weights are read
        try:
            quant.resolve_quantization(quantization, device)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    try:
        if path.is_file() and path.suffix == ".gguf":
            cache = (Path(cache_dir) if cache_dir else fetch.cache_dir()) if cache_weights else None
            args, state, name, template, reader = _read_gguf(path, cache)
        elif path.is_dir() and (path / "params.json").exists():
            args, state = _read_meta(path)
            name, template, reader = path.resolve().name, None, None
        elif path.is_dir() and (path / "config.json").exists():
            args, state = _read_hf(path)
            name, template, reader = path.resolve().name, read_hf_chat_template(path), None
        else:
            raise CheckpointError(f"{path}: unrecognised checkpoint; expected one of: {'; '.join(SUPPORTED_FORMATS)}")
    except UnsupportedArchitectureError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if args.context_length and max_seq_len > args.context_length:
        log.warning("max_seq_len %d exceeds the trained context %d: clamped", max_seq_len, args.context_length)
        max_seq_len = int(args.context_length)
    args.max_batch_size, args.max_seq_len = max_batch_size, max_seq_len
    file_type = gguf_value(reader.fields, "general.file_type", None) if reader is not None else None
    try:
        resolved = quant.resolve_quantization(quantization, device, file_type)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    model = build_model(args, state, device=device, dtype=dtype, source=path)
    if resolved == "int4":
        max_rows, dense_dtype = quant.default_layout()
        swapped, inexact = quant.quantize_int4(model, max_rows, dense_dtype, exact_only=quantization == "auto")
        log.info("int4 weights for %d linear layers; dense %s weights above %d rows", swapped, dense_dtype or dtype, max_rows)
        if inexact:
            log.warning("%d linear layers are not on a Q4_1 grid (other formats in the file): kept dense", inexact)
    if batch_invariant:
        make_batch_invariant(model)
    model.setup_cache(max_batch_size, max_seq_len, batch_invariant=batch_invariant)
    return LoadedWeights(model, args, name, template, reader, resolved)


def build_model(
    args: ModelArgs, state: dict[str, torch.Tensor], *, device: str | torch.device, dtype: torch.dtype, source: Path
) -> Transformer:
    """Transformer on the meta device, then take the (converted) tensors in place."""
    with torch.device("meta"), SkipRandomInit():
        model = Transformer(args)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    check_state_dict(expected, {k: tuple(v.shape) for k, v in state.items()}, source)
    converted = {name: state.pop(name).to(device=device, dtype=dtype) for name in list(state)}
    model.load_state_dict(converted, assign=True)
    model.requires_grad_(False)
    return model.eval()


class SkipRandomInit(TorchFunctionMode):
    """Skip in-place random init while building on the meta device: the weights are replaced anyway,
    and the first `normal_` on a meta tensor costs ~1.7 s of lazy torch imports."""

    SKIPPED = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "xavier_uniform_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def check_state_dict(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: Path) -> None:
    """Missing, unexpected and mis-shaped tensors, each named, before anything is assigned."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(found[name])}, expected {list(shape)}")


# ---- GGUF -------------------------------------------------------------------------------------

_QUANT_SUFFIX = re.compile(r"[.\-_](I?Q\d\w*|[BF]?F16|F32)$", re.IGNORECASE)


def gguf_model_name(path: Path) -> str:
    """Served id: the file stem without its quantisation suffix (SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct)."""
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def _read_gguf(path: Path, cache: Path | None) -> tuple[ModelArgs, dict[str, torch.Tensor], str, str | None, Any]:
    cached = gguf_weights.read_cached(path, cache) if cache is not None else None
    if cached is not None:  # warm start: no GGUF parsing at all
        state, args, reader = cached
    else:
        reader = gguf_weights.open_reader(path)
        try:
            args = ModelArgs.from_gguf_metadata(reader)
        except UnsupportedArchitectureError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: bad GGUF metadata: {e}") from e
        gguf_weights.check_rope_freqs(reader, args)
        state = gguf_weights.load_state(reader, args, path, cache)
    template = gguf_value(reader.fields, "tokenizer.chat_template", None)
    return args, state, gguf_model_name(path), template, reader


# ---- HF safetensors ---------------------------------------------------------------------------

_HF_GLOBAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def hf_to_ours(name: str) -> str:
    """HF parameter name -> ours; unknown names are returned unchanged (and reported as unexpected)."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    match = _HF_LAYER_RE.fullmatch(name)
    if match and match.group(2) in _HF_LAYER:
        return f"layers.{match.group(1)}.{_HF_LAYER[match.group(2)]}.{match.group(3)}"
    return name


def _read_hf(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unreadable: {e}") from e
    try:
        args = ModelArgs.from_hf_config(config)
    except UnsupportedArchitectureError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    files = hf_weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    state[hf_to_ours(key)] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from e
    if args.tie_word_embeddings:
        state.pop("output.weight", None)  # some exports write the tied head out as well
    return args, state


def hf_weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index: {e}") from e
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: config.json found but no *.safetensors weights")
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: shard listed in the index is missing")
    return files


def read_hf_chat_template(path: Path) -> str | None:
    """chat_template.jinja (newer transformers) or tokenizer_config.json's chat_template."""
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    config_file = path / "tokenizer_config.json"
    if not config_file.exists():
        return None
    try:
        template = json.loads(config_file.read_text()).get("chat_template")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: invalid JSON: {e}") from e
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


# ---- Meta consolidated.*.pth ------------------------------------------------------------------

# How Meta's model-parallel layers split a weight across shards (fairscale): column-parallel along
# dim 0, row-parallel along dim 1; norms are replicated. The embedding is found by shape (Llama 2
# splits it along dim 1, Llama 3 along dim 0).
_META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _read_meta(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    shard_files = sorted(path.glob("consolidated.*.pth"))
    if not shard_files:
        raise CheckpointError(f"{path}: params.json found but no consolidated.*.pth weights")
    shards = [_torch_load(f) for f in shard_files]
    try:
        args = ModelArgs.from_params_json(path / "params.json", tie_word_embeddings="output.weight" not in shards[0])
    except (OSError, ValueError, TypeError, AttributeError) as e:  # ValueError covers JSONDecodeError
        raise CheckpointError(f"{path / 'params.json'}: {e}") from e
    state = merge_meta_shards(shards, args.dim, path)
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(f"{path}: missing tensor tok_embeddings.weight")
    if args.vocab_size <= 0:  # Llama 2 writes vocab_size -1
        args.vocab_size = int(state["tok_embeddings.weight"].shape[0])
    for name in list(state):
        if name.endswith("attention.wq.weight"):
            state[name] = unpermute_meta(state[name], args.n_heads)
        elif name.endswith("attention.wk.weight"):
            state[name] = unpermute_meta(state[name], args.n_kv_heads)  # type: ignore[arg-type]
    state.pop("rope.freqs", None)  # Llama 2 checkpoints store their rope table; it is recomputed
    return args, state


def unpermute_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> rotate_half halves (same as llama.cpp's layout)."""
    if w.shape[0] % (2 * n_heads):
        raise CheckpointError(f"rotary weight of shape {list(w.shape)} does not split into {n_heads} heads")
    return gguf_weights.unpermute_rotary(w, n_heads)


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError on bad files
        raise CheckpointError(f"{file}: unreadable checkpoint shard (truncated or corrupt?): {e}") from e


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], dim: int, source: Path) -> dict[str, torch.Tensor]:
    """One state dict from Meta's model-parallel shards (a single shard is returned as it is)."""
    if len(shards) == 1:
        return dict(shards[0])
    names = list(shards[0])
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))
            raise CheckpointError(f"{source}: shard {i} has different tensors from shard 0: {', '.join(diff[:5])}")
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        parts = [shard[name] for shard in shards]
        split = meta_split_dim(name, parts[0], dim)
        merged[name] = parts[0] if split is None else torch.cat(parts, dim=split)
    return merged


def meta_split_dim(name: str, part: torch.Tensor, dim: int) -> int | None:
    """The dim a shard tensor was split along, or None for replicated tensors (norms)."""
    if part.dim() < 2:
        return None
    if name == "tok_embeddings.weight":  # Llama 2: ParallelEmbedding (dim 1); Llama 3: vocab-parallel (dim 0)
        return 0 if part.shape[1] == dim else 1
    if name == "output.weight":
        return 0
    return _META_SPLIT_DIM.get(name.split(".")[-2])
