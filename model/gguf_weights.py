"""GGUF files -> args, our state dict, name and chat template: dequantise, rename, undo llama.cpp's
rotary permutation.

The result is cached as an fp32 safetensors file in the llamaserve cache dir (keyed by the GGUF's
path, size and mtime), streamed to disk one tensor at a time, so a second start memory-maps the
weights instead of parsing and dequantising again, and the first start never holds two copies.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from safetensors import safe_open

from model.args import ModelArgs, RopeScaling, UnsupportedArchitectureError, gguf_value
from model.errors import CheckpointError
from model.rope import rope_frequencies

if TYPE_CHECKING:  # gguf itself is imported only when a GGUF is parsed (a warm start never does)
    from gguf import GGUFReader, ReaderTensor

log = logging.getLogger(__name__)

CACHE_FORMAT = "2"  # bump when the cached layout changes so old caches are ignored

# GGUF tensor name -> our parameter name ({i} is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_q.bias": "attention.wq.bias",
    "attn_k.weight": "attention.wk.weight",
    "attn_k.bias": "attention.wk.bias",
    "attn_v.weight": "attention.wv.weight",
    "attn_v.bias": "attention.wv.bias",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
# Tensors llama.cpp writes that are not parameters: the Llama 3.1 rope factors (checked against
# the metadata in `rope_scaling_from_factors`).
ROPE_FREQS = "rope_freqs.weight"
# Architectures whose Q/K rows llama.cpp's converter permutes (LlamaModel.permute); qwen2 is not.
PERMUTED_ARCHITECTURES = ("llama",)


def our_name(gguf_name: str) -> str | None:
    """Our parameter name for a GGUF tensor name, or None if it is not one we know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rotary rows (Meta / llama.cpp) -> HF rotate_half rows; works for weights and biases."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_reader(path: Path) -> GGUFReader:
    """gguf.GGUFReader with a clear error for a file that is not a complete GGUF."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct.error on bad input
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e


def tensor_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """Torch (out, in) order: ggml lists dimensions innermost first."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def dequantize(tensor: ReaderTensor) -> torch.Tensor:
    """One GGUF tensor as an fp32 torch tensor in (out, in) order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        array = gguf_dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise CheckpointError(f"tensor {tensor.name!r}: quantisation {qtype.name} is not supported ({e})") from e
    array = np.asarray(array, dtype=np.float32).reshape(tensor_shape(tensor))
    if not array.flags.writeable:  # F32 data is a read-only view of the memory map
        array = array.copy()
    return torch.from_numpy(array)


def iter_state_dict(reader: GGUFReader, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, fp32 tensor) for every parameter tensor in the file, Q/K already in rotate_half layout."""
    permute = args.architecture in PERMUTED_ARCHITECTURES
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue
        name = our_name(tensor.name)
        if name is None:
            raise CheckpointError(f"unexpected tensor {tensor.name!r} in GGUF file (architecture {args.architecture})")
        weight = dequantize(tensor)
        if permute and ".attention.wq." in name:
            weight = unpermute_rotary(weight, args.n_heads)
        elif permute and ".attention.wk." in name:
            weight = unpermute_rotary(weight, args.n_kv_heads)
        yield name, weight


def planned_shapes(reader: GGUFReader) -> dict[str, tuple[int, ...]]:
    """Our name -> shape for every parameter tensor, known before anything is dequantised."""
    return {our_name(t.name) or t.name: tensor_shape(t) for t in reader.tensors if t.name != ROPE_FREQS}


def check_rope_freqs(reader: GGUFReader, args: ModelArgs) -> None:
    """Llama 3.1 GGUFs carry the rope scaling as per-frequency factors: make sure ours match them."""
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        return
    factors = dequantize(tensor)
    if args.rope_scaling is None:
        args.rope_scaling = rope_scaling_from_factors(factors)
    plain = rope_frequencies(args.head_dim, args.rope_theta, None)
    scaled = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    if factors.shape != plain.shape or not torch.allclose(plain / factors, scaled, rtol=1e-4):
        raise CheckpointError(f"{ROPE_FREQS} does not match Llama 3.1 rope scaling {args.rope_scaling}: unsupported")


def rope_scaling_from_factors(factors: torch.Tensor) -> RopeScaling:
    """Llama 3.1/3.2 GGUFs store only the factors: the largest is `factor`, the rest are Meta's defaults."""
    return RopeScaling(factor=float(factors.max()))


# ---- the fp32 safetensors cache ---------------------------------------------------------------


def cache_prefix(gguf_path: Path) -> str:
    """File-name prefix shared by every cache entry of one GGUF path."""
    digest = hashlib.sha256(str(gguf_path.resolve()).encode()).hexdigest()[:12]
    return f"{gguf_path.stem}-{digest}-"


def cache_file(gguf_path: Path, cache_dir: Path) -> Path:
    """Cache entry for this exact file version: path hash + size + mtime in the name."""
    stat = gguf_path.stat()
    name = f"{cache_prefix(gguf_path)}{stat.st_size}-{stat.st_mtime_ns}.v{CACHE_FORMAT}.safetensors"
    return cache_dir / "converted" / name


def write_cache(
    target: Path,
    prefix: str,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
) -> None:
    """Stream fp32 tensors into a safetensors file (header first, then data), then rename atomically.

    Streaming keeps only one dequantised tensor in memory at a time. Older entries for the same GGUF
    path are removed once the new one is in place.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # unique on a volume pods share
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, tensor in tensors:
                expected = header[name]["shape"]
                if list(tensor.shape) != expected:
                    raise RuntimeError(f"{name}: shape {list(tensor.shape)} differs from planned {expected}")
                f.write(tensor.contiguous().numpy().tobytes())
        if tmp.stat().st_size != 8 + len(blob) + offset:
            raise RuntimeError(f"cache file {tmp} has the wrong size")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    for old in target.parent.glob(f"{glob.escape(prefix)}*.safetensors"):
        if old != target:
            old.unlink(missing_ok=True)


def read_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Memory-mapped tensors and the metadata of a cache entry."""
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})


class CachedField:
    """One GGUF metadata value read back from the cache; `.contents()` like gguf's ReaderField."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def contents(self) -> Any:
        return self.value


class CachedReader:
    """Stands in for gguf.GGUFReader on a warm start: `.fields[key].contents()` only (what the
    tokenizer reads), without re-parsing the ~100k token strings of the GGUF."""

    def __init__(self, fields: dict[str, Any], tensor_names: list[str]) -> None:
        self.fields = {key: CachedField(value) for key, value in fields.items()}
        self.tensor_names = tensor_names


def gguf_fields(reader: GGUFReader) -> dict[str, Any]:
    """All metadata values except the file-structure ones, as plain JSON-able values."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def args_to_json(args: ModelArgs) -> str:
    return json.dumps(dataclasses.asdict(args))


def args_from_json(text: str) -> ModelArgs:
    values = json.loads(text)
    if values.get("rope_scaling") is not None:
        values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
    return ModelArgs(**values)


def read_cached(gguf_path: Path, cache_dir: Path) -> tuple[dict[str, torch.Tensor], ModelArgs, CachedReader] | None:
    """Weights, args and metadata of this GGUF version from the cache, or None (absent or damaged)."""
    target = cache_file(gguf_path, cache_dir)
    if not target.exists():
        return None
    try:
        state, metadata = read_cache(target)
        args = args_from_json(metadata["args"])
        reader = CachedReader(json.loads(metadata["gguf_fields"]), json.loads(metadata["tensor_names"]))
    except Exception as e:  # noqa: BLE001 - a damaged entry is rebuilt, never fatal
        log.warning("ignoring unreadable weight cache %s: %s", target, e)
        target.unlink(missing_ok=True)
        return None
    return state, args, reader


def load_state(reader: GGUFReader, args: ModelArgs, gguf_path: Path, cache_dir: Path | None) -> dict[str, torch.Tensor]:
    """Our fp32 state dict, dequantised from the file, written to the cache (with args and metadata
    for the next start) and read back memory-mapped.

    cache_dir None: no cache, dequantise in memory. A cache that cannot be written is only a warning.
    """
    if cache_dir is None:
        return dict(iter_state_dict(reader, args))
    target = cache_file(gguf_path, cache_dir)
    metadata = {
        "format": CACHE_FORMAT,
        "source": str(gguf_path.resolve()),
        "args": args_to_json(args),
        "gguf_fields": json.dumps(gguf_fields(reader)),
        "tensor_names": json.dumps([t.name for t in reader.tensors]),
    }
    try:
        write_cache(target, cache_prefix(gguf_path), planned_shapes(reader), iter_state_dict(reader, args), metadata)
    except OSError as e:
        log.warning("cannot write weight cache %s (%s): dequantising in memory", target, e)
        return dict(iter_state_dict(reader, args))
    log.info("cached dequantised weights at %s", target)
    return read_cache(target)[0]


# ---- the whole file ---------------------------------------------------------------------------

_QUANT_SUFFIX = re.compile(r"[.\-_](I?Q\d\w*|[BF]?F16|F32)$", re.IGNORECASE)


def gguf_model_name(path: Path) -> str:
    """Served id: the file stem without its quantisation suffix (SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct)."""
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def read_gguf(path: Path, cache: Path | None) -> tuple[ModelArgs, dict[str, torch.Tensor], str, str | None, Any]:
    """args, state dict, served name, chat template and the reader (for the tokenizer); from the
    fp32 cache when it holds this file version (cache None: no cache)."""
    cached = read_cached(path, cache) if cache is not None else None
    reader: GGUFReader | CachedReader
    if cached is not None:  # warm start: no GGUF parsing at all
        state, args, reader = cached
    else:
        parsed = open_reader(path)
        try:
            args = ModelArgs.from_gguf_metadata(parsed)
        except UnsupportedArchitectureError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: bad GGUF metadata: {e}") from e
        check_rope_freqs(parsed, args)
        state = load_state(parsed, args, path, cache)
        reader = parsed
    template = gguf_value(reader.fields, "tokenizer.chat_template", None)
    return args, state, gguf_model_name(path), template, reader
