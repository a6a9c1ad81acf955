"""transformers as the oracle (tiny HF Llama/Qwen2, their logits, its GGUF loader), the golden prompt, our greedy decode."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOL = 1e-4
# default-model.md: "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
GOLDEN_PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from HF's tiny init so that layout mistakes show up in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_hf_llama(tie: bool = False, intermediate: int = 192, scaling_original: int = 64, seed: int = 0):  # type: ignore[no-untyped-def]
    """Llama with GQA (4 heads, 2 KV heads) and Llama 3.1 rope scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=tie,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": scaling_original,
        },
    )
    torch.manual_seed(seed)
    return randomise(LlamaForCausalLM(config), seed)


def tiny_hf_qwen2(seed: int = 0):  # type: ignore[no-untyped-def]
    """Qwen2: qkv bias, tied head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return randomise(Qwen2ForCausalLM(config), seed)


def hf_logits(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@contextmanager
def one_thread() -> Iterator[None]:
    """Batch-1 decode is as fast on one thread, and does not collapse when the 2 cores are shared
    (spin-waiting torch threads slow ~10x under other load)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Our greedy decode (one prefill, then one token per step in slot 0): tokens and each step's logits."""
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None])
    tokens: list[int] = []
    step_logits = []
    with one_thread():
        for i in range(steps):
            step_logits.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([[len(prompt) + i]]))
    return tokens, torch.stack(step_logits)


def transformers_gguf_model(path: Path):  # type: ignore[no-untyped-def]
    """transformers' own GGUF loading (config, dequantisation, un-permutation), offline.

    `from_pretrained(dir, gguf_file=...)` insists on `accelerate`, which is not installed; it calls
    the same `load_gguf_checkpoint` used here, so the oracle is the same code.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    with no_init_weights():  # every weight is loaded below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys, result
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()
