"""Our int4 GEMM (model/int4_gemm.py, model/kernels/int4_gemm.c): the product it promises (bfloat16
activations times exact 4-bit weights, float32 scale and zero per group) to float32 summation order, a row's
bits independent of its batch and of the thread count, a torch operator the compiled step captures, used by
Int4Linear where the CPU has AVX512-BF16 and torch's kernel kept (with the reason) everywhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from model import int4_gemm, quant
from model.int4_gemm import GROUP_SIZE, native_gemm, pack, self_check
from model.native import c_compiler, load_kernel
from model.quant import Int4Linear, quantize_groups

needs_native = pytest.mark.skipif(
    c_compiler() is None or native_gemm()[0] is None, reason="no AVX512-BF16 or no C compiler here: torch's int4 kernel is used"
)


def q4_1(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random Q4_1 groups whose scale and zero are float16 values, as a GGUF stores them."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), generator=generator)
    scale = (torch.rand(rows, cols // GROUP_SIZE, generator=generator) * 0.05).half().float()
    zero = (torch.randn(rows, cols // GROUP_SIZE, generator=generator) * 0.02).half().float()
    return q, scale, zero - 8 * scale


def expected_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The kernel's contract in float64: (q - 8) * scale times bfloat16(x), plus zero times x."""
    spread = lambda t: t.double().repeat_interleave(GROUP_SIZE, dim=1)  # noqa: E731
    zero = (minimum + 8 * scale).half()
    return x.bfloat16().double() @ ((q.double() - 8) * spread(scale)).T + x.double() @ spread(zero).T


def test_pack_puts_eight_ks_of_sixteen_columns_in_each_sixty_four_bytes() -> None:
    q, scale, minimum = q4_1(32, 64, seed=0)
    packed, scales, zeros = pack(q, scale, minimum)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 32, 16)  # blocks of 16 columns, K / 2 bytes each
    assert scales.dtype == zeros.dtype == torch.float16 and scales.shape == (2, 2, 16)
    block, chunk, column = 1, 5, 3
    four = packed[block].reshape(-1)[64 * chunk + 4 * column :][:4].tolist()  # column 3's bytes of k 40..47
    k = q[16 * block + column, 8 * chunk :][:8].tolist()
    assert [b & 15 for b in four] == [k[0], k[4], k[1], k[5]] and [b >> 4 for b in four] == [k[2], k[6], k[3], k[7]]
    assert torch.equal(int4_gemm.unpack(packed), q.to(torch.uint8))
    assert scales[block, 1, column] == scale[16 * block + column, 1]
    assert zeros[block, 0, column] == (minimum + 8 * scale)[16 * block + column, 0].half()
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(q[:24], scale[:24], minimum[:24])
    with pytest.raises(ValueError, match="float16's range"):
        pack(q, scale * 1e6, minimum)


@needs_native
@pytest.mark.parametrize(("rows", "cols"), [(16, 32), (48, 96), (960, 576), (576, 1536)])
def test_the_kernel_computes_its_contract_with_rows_independent_of_the_batch(rows: int, cols: int) -> None:
    """Shapes: one block and one group; an odd number of blocks (a tile of one); the default model's widths.
    Batches cross the 4-row register tiles and the dequantised path above 4 rows."""
    operator, _ = native_gemm()
    q, scale, minimum = q4_1(rows, cols, seed=rows)
    weights = pack(q, scale, minimum)
    x = torch.randn(33, cols, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([operator(x[i : i + 1], *weights) for i in range(x.shape[0])])
    for batch in (2, 3, 4, 5, 8, 9, 17, 33):
        assert torch.equal(operator(x[:batch], *weights), alone[:batch]), f"a batch of {batch} changed some row's bits"
    assert torch.equal(operator(x[6:13], *weights), alone[6:13]), "rows at other positions changed bits"
    expected = expected_product(x, q, scale, minimum)
    scale_of_sums = x.abs().double() @ ((q.double() - 8).abs() * scale.double().repeat_interleave(GROUP_SIZE, 1)).T
    assert ((alone.double() - expected).abs() <= 1e-5 * scale_of_sums.max() + 1e-6).all()


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
def test_a_rows_bits_do_not_depend_on_the_thread_count(threads: int) -> None:
    operator, _ = native_gemm()
    weights = pack(*q4_1(208, 128, seed=3))  # 13 blocks: the threads' shares differ in size
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    reference = operator(x, *weights)
    try:
        torch.set_num_threads(threads)
        assert torch.equal(operator(x, *weights), reference)
    finally:
        torch.set_num_threads(before)


@needs_native
def test_int4_linear_uses_it_and_is_closer_to_float32_than_torchs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's kernel rounds scales, zeros and its output to bfloat16; ours keeps them in float16/float32."""
    from tests.test_quant import gguf_q4_1_roundtrip

    linear = nn.Linear(576, 192, bias=False)
    with torch.no_grad():
        linear.weight.copy_(gguf_q4_1_roundtrip(torch.randn(192, 576, generator=torch.Generator().manual_seed(4)) * 0.05))
    ours = Int4Linear(linear, max_rows=64)
    assert ours.gemm is not None and "native" in ours.kernel and "kernel=native" in repr(ours)
    monkeypatch.setenv(int4_gemm.KERNEL_ENV, "torch")
    theirs = Int4Linear(linear, max_rows=64)
    assert theirs.gemm is None and "LLAMASERVE_INT4_KERNEL" in theirs.kernel
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(5))
    exact = x.double() @ linear.weight.double().T
    ours_error, theirs_error = ((layer(x).double() - exact).pow(2).mean().item() for layer in (ours, theirs))
    assert ours_error < theirs_error, (ours_error, theirs_error)


@needs_native
def test_the_compiled_step_captures_it_whole() -> None:
    """A torch operator, not a Python call: torch.compile keeps it in the graph (fullgraph) and the
    compiled layer gives the eager layer's bits."""
    linear = Int4Linear(nn.Linear(96, 48, bias=True), max_rows=64)
    assert linear.gemm is not None
    x = torch.randn(3, 1, 96, generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(linear, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        assert torch.equal(compiled(x), linear(x))


def test_torchs_kernel_stays_where_ours_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wherever this runs: an unknown choice is an error, `torch` is honoured, and a layer whose scales
    float16 cannot hold keeps torch's kernel with the reason."""
    monkeypatch.setenv(int4_gemm.KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="auto or torch"):
        native_gemm()
    monkeypatch.setenv(int4_gemm.KERNEL_ENV, "torch")
    assert native_gemm() == (None, "torch's kernel ($LLAMASERVE_INT4_KERNEL=torch)")
    monkeypatch.delenv(int4_gemm.KERNEL_ENV)
    if not quant.int4_kernel_available():
        pytest.skip("torch has no vector int4 kernel on this CPU")
    huge = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        huge.weight.mul_(1e7)
    layer = Int4Linear(huge, max_rows=8)
    assert layer.gemm is None and ("float16's range" in layer.kernel or "no native one" in layer.kernel)
    x = torch.randn(2, 64)
    expected = x @ quant.dequantize_groups(*quantize_groups(huge.weight)).T
    assert (layer(x) - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.skipif(c_compiler() is None, reason="no C compiler here")
def test_a_build_without_avx512_bf16_says_so_and_refuses_to_run() -> None:
    """CI's AVX2 stage builds this (model.native.isa_flags caps the ISA at torch's), as does any CPU before
    Zen 4 / Cooper Lake: the library loads, reports no kernel, and a call returns -3 instead of computing."""
    library = load_kernel("int4_gemm", ("-march=native", "-mno-avx512f"))
    assert library.int4_gemm_available() == 0
    null = 0
    assert library.int4_gemm(null, null, null, null, null, 1, 16, 32, 1) == -3


@needs_native
def test_the_kernel_refuses_bad_shapes() -> None:
    library = load_kernel("int4_gemm")
    x, out = torch.zeros(1, 64), torch.empty(1, 16)
    packed, scales, zeros = pack(*q4_1(16, 64, seed=7))
    pointers = (x.data_ptr(), packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr())
    library.int4_gemm.argtypes = int4_gemm._ARGTYPES
    assert library.int4_gemm(*pointers, 1, 16, 48, 1) == -1  # a width that is not whole groups
    assert library.int4_gemm(*pointers, 1, 24, 64, 1) == -1  # columns not whole blocks
    assert library.int4_gemm(*pointers, 1, 16, 64, 1) == 0


def test_the_load_time_check_refuses_a_batch_dependent_or_wrong_kernel() -> None:
    """What keeps a miscompiled build out of the model: self_check on stand-in operators."""

    def reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = int4_gemm.unpack(packed).double()
        spread = lambda t: t.permute(0, 2, 1).reshape(q.shape[0], -1).double().repeat_interleave(GROUP_SIZE, 1)  # noqa: E731
        return (x.bfloat16().double() @ ((q - 8) * spread(scale)).T + x.double() @ spread(zero).T).float()

    assert self_check(reference) is None
    assert "other bits in a batch" in str(self_check(lambda x, *w: reference(x, *w) + 1e-3 * (x.shape[0] > 1)))
    assert "off the float64 product" in str(self_check(lambda x, *w: reference(x, *w) * 1.01))


def test_quantize_groups_gives_what_pack_takes() -> None:
    """Int4Linear packs quantize_groups' output: q in 0..15 and the group minimum, whatever the weights."""
    weight = torch.from_numpy(np.linspace(-1, 1, 64 * 32, dtype=np.float32)).reshape(32, 64)
    q, scale, minimum = quantize_groups(weight)
    packed, scales, zeros = pack(q, scale, minimum)
    assert int(packed.max()) <= 255 and torch.equal(scales.float(), scale.half().float().reshape(2, 16, 2).permute(0, 2, 1))


@needs_native
def test_short_kernels_keep_the_gil_while_they_run() -> None:
    """150 short calls a token: each release of the GIL would let the server's event loop take it and the
    step wait for it back, so the operators call through `native.holding_the_gil`. A thread that counts
    while a long call runs must not advance until the call returns (through a plain ctypes.CDLL, which
    releases the GIL, it counts all along). The interpreter may hand it the GIL for a switch interval just
    before the call or after it returns: only the middle of the call is watched."""
    import ctypes
    import sys
    import threading
    import time

    from model.native import holding_the_gil

    weights = pack(*q4_1(2048, 4096, seed=9))
    x, out = torch.randn(2048, 4096), torch.empty(2048, 2048)
    kernel = holding_the_gil(load_kernel("int4_gemm")).int4_gemm
    kernel.argtypes, kernel.restype = int4_gemm._ARGTYPES, ctypes.c_int
    pointers = [t.data_ptr() for t in (x, *weights, out)]
    seen: list[float] = []
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            seen.append(time.perf_counter())

    counter = threading.Thread(target=count)
    counter.start()
    try:
        time.sleep(0.02)
        start = time.perf_counter()
        assert kernel(*pointers, 2048, 2048, 4096, torch.get_num_threads()) == 0
        end = time.perf_counter()
    finally:
        done.set()
        counter.join()
    edge = 2 * sys.getswitchinterval() + 0.002
    middle = (start + edge, (start + end) / 2)
    assert middle[1] - middle[0] > edge, f"the call ({(end - start) * 1e3:.0f} ms) was too short to tell"
    inside = [t for t in seen if middle[0] < t < middle[1]]
    assert not inside, f"another thread ran {len(inside)} times in the middle of a {(end - start) * 1e3:.0f} ms call"
