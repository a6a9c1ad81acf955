"""The int8 decode head (model/q8_head.py, model/kernels/q8_head.c): finds a Q8_0 file's grid exactly, gives
the float32 GEMM's logits up to summation order, the same bits for a row alone and in any batch, and is used
only where it loses nothing the checkpoint had -- else the float32 head stays, with the reason logged."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import q8_head
from model.checkpoint import load_model
from model.native import NativeBuildError, c_compiler, load_kernel
from model.q8_head import GROUP_SIZE, Q8Head, build_q8_head, dequantize_q8, quantize_q8
from tests.support import REPO

needs_compiler = pytest.mark.skipif(c_compiler() is None, reason="no C compiler here: the float32 head is used")


def gguf_q8_0_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """What a Q8_0 GGUF holds for `weight`, by gguf-py's own quantiser and dequantiser (the oracle)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    blocks = quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.asarray(dequantize(blocks, GGMLQuantizationType.Q8_0), dtype=np.float32)).reshape(weight.shape)


def on_grid_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return gguf_q8_0_roundtrip(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))


def test_requantising_a_q8_0_tensor_finds_its_grid_again() -> None:
    stored = on_grid_weight(40, 128)
    q, scale = quantize_q8(stored)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.equal(dequantize_q8(q, scale), stored)


def test_off_grid_weights_round_within_half_a_step() -> None:
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(3))
    q, scale = quantize_q8(weight)
    error = (dequantize_q8(q, scale) - weight).abs().reshape(16, -1, GROUP_SIZE)
    assert (error <= scale[..., None] / 2 + 1e-7).all() and error.max() > 0
    zeros = torch.zeros(2, 64)
    assert torch.equal(dequantize_q8(*quantize_q8(zeros)), zeros)  # an all-zero group does not divide by zero


def assert_rows_invariant_and_close(head: Q8Head, weight: torch.Tensor) -> None:
    """Every row: the same bits alone as in batches that cross the kernel's register tiles, and within
    float32 summation-order error of x @ weight.T."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(33, weight.shape[1], generator=generator)
    alone = torch.cat([head(x[i : i + 1]) for i in range(x.shape[0])])
    for batch in (2, 3, 4, 5, 8, 9, 17, 33):
        assert torch.equal(head(x[:batch]), alone[:batch]), f"a batch of {batch} changed some row's bits"
    assert torch.equal(head(x[7:12]), alone[7:12]), "rows moved to other positions changed bits"
    torch.testing.assert_close(alone, x @ weight.T, rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("vocab", [259, 1000, 1031])  # vocabularies padded to whole tiles of 32, and tails of the thread split
def test_native_head_is_the_float32_product_with_rows_independent_of_the_batch(vocab: int) -> None:
    weight = on_grid_weight(vocab, 96, seed=vocab)
    head, what = build_q8_head(weight, exact_only=True)
    assert head is not None and head.exact, what
    assert_rows_invariant_and_close(head, weight)
    assert head(torch.zeros(1, 96)).abs().max() == 0


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
def test_native_head_bits_do_not_depend_on_the_thread_count(threads: int) -> None:
    weight = on_grid_weight(517, 64)
    head, _ = build_q8_head(weight, exact_only=True)
    assert head is not None
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    reference = head(x)
    try:
        torch.set_num_threads(threads)
        assert torch.equal(head(x), reference)
    finally:
        torch.set_num_threads(before)


@needs_compiler
def test_the_avx2_build_is_right_too() -> None:
    """CI's AVX2 stage builds this variant by itself (model.native.isa_flags); here it is asked for directly,
    on any CPU that runs AVX2 (the vector width and register tiles differ from the AVX-512 build's)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    weight = on_grid_weight(300, 128)
    q, scale = quantize_q8(weight)
    head = Q8Head(q, scale, load_kernel("q8_head", ("-march=native", "-mno-avx512f")), exact=True)
    assert_rows_invariant_and_close(head, weight)


@needs_compiler
def test_the_kernel_refuses_bad_shapes() -> None:
    weight = on_grid_weight(8, 64)
    head, _ = build_q8_head(weight, exact_only=True)
    assert head is not None
    with pytest.raises(ValueError, match="64"):
        head(torch.zeros(2, 32))
    x, out = torch.zeros(1, 64), torch.empty(1, 8)
    q, scale = quantize_q8(weight)
    status = head._kernel(q.data_ptr(), scale.data_ptr(), x.data_ptr(), out.data_ptr(), 8, 33, 1, 1)
    assert status == -1  # a width that is not whole groups


def test_float32_stays_where_the_head_is_off_grid_or_cannot_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    off_grid = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    head, why = build_q8_head(off_grid, exact_only=True)
    assert head is None and "not on a Q8_0 grid" in why
    head, why = build_q8_head(off_grid.to(torch.bfloat16), exact_only=False)
    assert head is None and "bfloat16" in why
    head, why = build_q8_head(torch.zeros(64, 40), exact_only=False)
    assert head is None and "multiple of 32" in why

    def no_compiler(name: str) -> None:
        raise NativeBuildError("no C compiler on PATH")

    monkeypatch.setattr(q8_head, "load_kernel", no_compiler)
    head, why = build_q8_head(on_grid_weight(64, 64), exact_only=True)
    assert head is None and "no C compiler" in why


@needs_compiler
def test_explicit_int4_rounds_an_off_grid_head_to_the_grid() -> None:
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(4))
    head, what = build_q8_head(weight, exact_only=False)
    assert head is not None and not head.exact and "rounded" in what
    assert_rows_invariant_and_close(head, dequantize_q8(*quantize_q8(weight)))


@needs_compiler
def test_a_build_whose_rows_depend_on_the_batch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load-time check is what keeps a miscompiled or non-invariant build out of the model."""
    real_call = Q8Head.__call__

    def batch_dependent(self: Q8Head, x: torch.Tensor) -> torch.Tensor:
        out = real_call(self, x)
        return out + 1e-3 * (x.shape[0] > 1)

    monkeypatch.setattr(Q8Head, "__call__", batch_dependent)
    head, why = build_q8_head(on_grid_weight(64, 64), exact_only=True)
    assert head is None and "other bits in a batch" in why


@needs_compiler
def test_the_default_model_decodes_through_the_exact_int8_head(smollm2_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The default GGUF stores its tied head as Q8_0: `auto` uses the int8 head, whose logits are the
    float32 head's up to summation order, with the same greedy choice (near-ties aside)."""
    with caplog.at_level(logging.INFO, logger="model.checkpoint"):
        loaded = load_model(smollm2_path, max_batch_size=4, max_seq_len=256, quantization="auto")
    model = loaded.model
    if loaded.quantization != "int4":
        pytest.skip("no int4 path on this CPU: the head stays float32 with the float32 layers")
    assert model.quantized_head is not None and model.quantized_head.exact
    assert "exact" in caplog.text and model.head_column_tiles == ()
    tokens = torch.tensor([loaded.tokenizer.encode("The capital of France is")])
    positions = torch.arange(tokens.shape[1])[None]
    hidden = {}
    model.norm.register_forward_hook(lambda module, args, out: hidden.__setitem__("h", out))
    logits = model(tokens, positions)
    float32 = hidden["h"].reshape(1, -1) @ model.head_weight().T
    torch.testing.assert_close(logits, float32, rtol=1e-5, atol=2e-4)
    # The same choice, up to a near-tie that summation order may flip: float32's pick scores within 1e-4 of the top.
    assert logits[0, float32.argmax(-1)] >= logits.max() - 1e-4


@needs_compiler
def test_the_kernel_runs_on_torchs_own_openmp_runtime() -> None:
    """Threads of its own would wait for torch's pool to stop spinning after the layers before the head:
    the kernel is built with -fopenmp so the loader hands it the libgomp torch has loaded already. In a
    fresh process: other wheels (sentencepiece) bring OpenMP runtimes of their own under other names."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc here to list the loaded libraries")
    script = (
        "import torch\n"
        "from model.native import load_kernel\n"
        "print(load_kernel('q8_head').q8_head_threads(2))\n"
        "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO).stdout
    threads, runtimes = out.splitlines()
    assert threads == "2", "the kernel's parallel region did not get 2 threads (built without OpenMP?)"
    assert runtimes.count("libgomp") == 1 and "torch" in runtimes, f"OpenMP runtimes after loading the kernel: {runtimes}"
