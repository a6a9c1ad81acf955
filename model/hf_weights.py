"""HF checkpoint directories: config.json + (sharded) *.safetensors -> our names, and the chat template.

HF llama/qwen2 weights are already in the rotate_half rotary layout: only the names change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.args import ModelArgs, UnsupportedArchitectureError
from model.errors import CheckpointError

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


def read_hf(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Args from config.json and every shard's tensors under our names."""
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
