"""Our kernels as C++ torch operators (model/kernels/torch_ops.cpp via model/native.py): the same bits as the
kernel called directly, any input layout taken, bad input a clear error and not a crash, the library kept in
Inductor's cache directory between runs, and the Python operators kept where asked or where it cannot build."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import decode_attention as attention
from model import int4_gemm
from model.native import OPERATORS_ENV, cxx_compiler, holding_the_gil, load_kernel
from tests.support import REPO

gemm_operator, gemm_kind = int4_gemm.native_gemm()
attention_operator, attention_kind = attention.native_decode_attention(9, 3, 64, torch.float32, "cpu")
needs_cxx_gemm = pytest.mark.skipif("C++ operator" not in gemm_kind, reason=f"no C++ int4 operator here: {gemm_kind}")
needs_cxx_attention = pytest.mark.skipif(
    "C++ operator" not in attention_kind, reason=f"no C++ attention operator here: {attention_kind}"
)


def q4_1_weights(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows + cols)
    q = torch.randint(0, 16, (rows, cols), generator=generator)
    scale = (torch.rand(rows, cols // 32, generator=generator) * 0.05).half().float()
    minimum = (torch.randn(rows, cols // 32, generator=generator) * 0.02).half().float() - 8 * scale
    return int4_gemm.pack(q, scale, minimum)


@needs_cxx_gemm
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_the_int4_operator_is_the_kernel_called_directly(rows: int) -> None:
    weights = q4_1_weights(96, 160)
    x = torch.randn(rows, 160)
    direct = torch.empty(rows, 96)
    kernel = holding_the_gil(load_kernel("int4_gemm")).int4_gemm
    kernel.argtypes, kernel.restype = int4_gemm._ARGTYPES, ctypes.c_int
    assert kernel(*(t.data_ptr() for t in (x, *weights, direct)), rows, 96, 160, torch.get_num_threads()) == 0
    assert gemm_operator is torch.ops.llamaserve_c.int4_gemm.default
    assert torch.equal(gemm_operator(x, *weights), direct)
    # A strided view (as a compiled graph may pass) gives the same bits as its contiguous copy.
    wide = torch.randn(rows, 320)
    assert torch.equal(gemm_operator(wide[:, ::2], *weights), gemm_operator(wide[:, ::2].contiguous(), *weights))


@needs_cxx_gemm
def test_the_int4_operator_refuses_bad_input_with_a_message() -> None:
    weights = q4_1_weights(32, 64)
    with pytest.raises(RuntimeError, match="int4_gemm takes x as \\(M, K\\) float32"):
        gemm_operator(torch.randn(2, 64, dtype=torch.float64), *weights)
    with pytest.raises(RuntimeError, match="int4_gemm kernel failed with status -1"):
        gemm_operator(torch.randn(2, 48), *weights)  # K not a multiple of 32


@needs_cxx_attention
def test_the_attention_operator_is_the_python_operator_bit_for_bit() -> None:
    """Against the plain ops' contract it is tested in test_decode_attention_kernel; here, the C++ wrapper
    against a direct kernel call on the same inputs, with keys and values strided as views of a cache."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(4, 9, 1, 64, generator=generator)
    cache_k, cache_v = (torch.randn(6, 3, 40, 64, generator=generator) for _ in range(2))
    keys, values = cache_k[1:5, :, :24], cache_v[1:5, :, :24]  # a window of slots, the first 24 positions
    positions = torch.tensor([[3], [23], [0], [11]])
    out = torch.empty(4, 9, 1, 64)
    kernel = holding_the_gil(load_kernel("decode_attention")).decode_attention
    kernel.argtypes, kernel.restype = attention._ARGTYPES, ctypes.c_int
    flat = positions.reshape(4).contiguous()
    status = kernel(
        q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(), *keys.stride()[:3], flat.data_ptr(),
        out.data_ptr(), 4, 9, 3, 24, 64, torch.get_num_threads(),
    )  # fmt: skip
    assert status == 0
    assert attention_operator is torch.ops.llamaserve_c.decode_attention.default
    assert torch.equal(attention_operator(q, keys, values, positions), out)
    # keys and values with different strides are copied to one layout first: still the same numbers.
    assert torch.equal(attention_operator(q, keys, values.contiguous(), positions), out)
    with pytest.raises(RuntimeError, match="one int64 position a row"):
        attention_operator(q, keys, values, positions.int())


def run_fresh(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=REPO, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_cxx_gemm
def test_the_library_is_built_once_into_inductors_cache_and_reused(tmp_path: Path) -> None:
    code = "from model import int4_gemm; print(int4_gemm.native_gemm()[1])\n"
    assert "C++ operator" in run_fresh(code, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    built = list((tmp_path / "llamaserve").glob("torch_ops-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert "C++ operator" in run_fresh(code, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    assert list((tmp_path / "llamaserve").glob("torch_ops-*.so")) == built and built[0].stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "llamaserve").iterdir() if p not in built]  # no build directory left behind


@pytest.mark.skipif(gemm_operator is None, reason=f"no native int4 kernel here: {gemm_kind}")
def test_python_operators_where_asked() -> None:
    code = (
        "import torch\n"
        "from model import int4_gemm, decode_attention as a\n"
        "print(int4_gemm.native_gemm()[1])\n"
        "print(a.native_decode_attention(9, 3, 64, torch.float32, 'cpu')[1])\n"
        "print(int4_gemm.native_gemm()[0] is torch.ops.llamaserve.int4_gemm.default)\n"
    )
    lines = run_fresh(code, **{OPERATORS_ENV: "python"}).splitlines()
    assert "Python operator: $LLAMASERVE_OPERATORS=python" in lines[0] and lines[2] == "True"
    assert "plain ops" in lines[1] or "Python operator" in lines[1]
    refused = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={**os.environ, OPERATORS_ENV: "c"}
    )
    assert refused.returncode != 0 and "must be auto or python" in refused.stderr


@pytest.mark.skipif(gemm_operator is None, reason=f"no native int4 kernel here: {gemm_kind}")
def test_python_operators_where_no_cpp_compiler(tmp_path: Path) -> None:
    c_only = tmp_path / "bin"
    c_only.mkdir()
    for tool in ("cc", "as", "ld"):  # the C compiler and the assembler and linker it runs
        found = shutil.which(tool)
        assert found is not None, f"no {tool} here"
        (c_only / tool).symlink_to(found)
    code = "from model import int4_gemm; print(int4_gemm.native_gemm()[1])\n"
    assert "Python operator: no C++ compiler on PATH" in run_fresh(code, PATH=str(c_only), CXX="")


def test_a_cpp_compiler_is_found_where_the_image_has_one() -> None:
    """The container and CI install g++ (Inductor needs it); were it missing, the tests above would skip."""
    assert cxx_compiler() is not None
