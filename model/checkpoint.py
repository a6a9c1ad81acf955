"""Load a checkpoint (Meta `.pth`, HF safetensors or GGUF) into a ready-to-run `Transformer`.

Every format becomes one state dict in our names (Meta's) and the rotate_half rotary layout (the
readers: gguf_weights.py, hf_weights.py, meta_weights.py); the network is built on the meta device
and takes the tensors with `assign=True`, so weights are never held twice. A tied head reuses the
embedding tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from model import quant
from model.args import ModelArgs, UnsupportedArchitectureError, gguf_value
from model.errors import CheckpointError  # re-exported: callers import it from here
from model.fetch import default_cache_dir
from model.gguf_weights import read_gguf
from model.hf_weights import read_hf, read_hf_chat_template
from model.invariance import make_batch_invariant
from model.llama import Transformer
from model.meta_weights import read_meta
from model.q8_head import build_q8_head
from model.tensor_parallel import checkpoint_plan, parallelize
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
    tensor_parallel: tuple[int, int] | None = None,
) -> LoadedModel:
    """Model + tokenizer + name + chat template from a checkpoint path (format detected).

    max_seq_len is clamped to the trained context length when that is known and smaller.
    GGUF weights are cached as fp32 safetensors under cache_dir (default: ~/.cache/llamaserve; the
    server passes its Settings.cache_dir) unless cache_weights is False. quantization: none, int4 (CPU, see
    model/quant.py) or auto (int4 for a Q4_1 GGUF on a CPU that has the int4 kernel).
    batch_invariant: a row's numbers never depend on the rest of its batch (model/invariance.py).
    tensor_parallel: (rank, world) -- load only this rank's shard and sum the row-parallel layers
    across the default process group, which must be initialised (model/tensor_parallel.py).
    """
    path = Path(path)
    weights = load_weights(
        path,
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        cache_dir=cache_dir,
        cache_weights=cache_weights,
        quantization=quantization,
        batch_invariant=batch_invariant,
        tensor_parallel=tensor_parallel,
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
    tensor_parallel: tuple[int, int] | None = None,
) -> LoadedWeights:
    """The network with its weights and KV cache, without the tokenizer (this rank's shard of it under
    tensor_parallel; `args` stay the full model's)."""
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
    presharded = False  # the reader already kept only this rank's slices
    try:
        if path.is_file() and path.suffix == ".gguf":
            cache = Path(cache_dir or default_cache_dir()) if cache_weights else None
            args, state, name, template, reader = read_gguf(path, cache)
        elif path.is_dir() and (path / "params.json").exists():
            args, state = read_meta(path, tensor_parallel)  # sliced per rank while reading: see read_meta
            name, template, reader = path.resolve().name, None, None
            presharded = tensor_parallel is not None
        elif path.is_dir() and (path / "config.json").exists():
            args, state = read_hf(path)
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
    model = assemble_model(
        args,
        state,
        device=device,
        dtype=dtype,
        source=path,
        quantization=resolved,
        exact_int4_only=quantization == "auto",
        batch_invariant=batch_invariant,
        tensor_parallel=tensor_parallel,
        presharded=presharded,
    )
    return LoadedWeights(model, args, name, template, reader, resolved)


def assemble_model(
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    source: Path,
    quantization: str = "none",
    exact_int4_only: bool = False,
    batch_invariant: bool = True,
    tensor_parallel: tuple[int, int] | None = None,
    presharded: bool = False,
) -> Transformer:
    """A full state dict (our names) -> the ready network: this rank's shard of it under tensor_parallel,
    projections fused, int4 where asked (`quantization` already resolved), batch invariant, cache set
    up (args.max_batch_size x args.max_seq_len). load_weights' second half; benchmarks call it with
    random weights. presharded: `state` holds this rank's slices already (a reader took them)."""
    build_args = args
    if tensor_parallel is not None:
        plan = checkpoint_plan(args, tensor_parallel, source)
        state, build_args = (state if presharded else plan.shard_state(state)), plan.local_args(args)
        log.info(
            "tensor parallel rank %d/%d: query heads %s, KV heads %s, feed-forward columns %s",
            *tensor_parallel,
            plan.q_heads,
            plan.kv_heads,
            plan.hidden,
        )
    model = build_model(build_args, state, device=device, dtype=dtype, source=source)
    model.fuse_projections()  # before quantizing: the fused layers are quantized whole
    if quantization == "int4":
        max_rows, dense_dtype = quant.default_layout()
        swapped, inexact = quant.quantize_int4(model, max_rows, dense_dtype, exact_only=exact_int4_only)
        log.info(
            "int4 weights for %d linear layers (%s); dense %s weights above %d rows",
            swapped,
            quant.int4_gemm.native_gemm()[1],
            dense_dtype or dtype,
            max_rows,
        )
        if inexact:
            log.warning("%d linear layers are not on a Q4_1 grid (other formats in the file): kept dense", inexact)
        if tensor_parallel is None:  # tensor-parallel ranks keep the float32 head: the int8 one is not checked there
            model.quantized_head, what = build_q8_head(model.head_weight(), exact_only=exact_int4_only)
            log.info("output head for decode: %s", what)
    if batch_invariant:
        make_batch_invariant(model)
    model.setup_cache(args.max_batch_size, args.max_seq_len, batch_invariant=batch_invariant)
    log.info("decode attention: %s", model.decode_attention_kernel)
    if tensor_parallel is not None:
        parallelize(model)
    return model


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

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
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
        raise CheckpointError(
            f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(found[name])}, expected {list(shape)}")
