"""Small C kernels of our own (model/kernels/*.c), built when a model loads and called through ctypes.

Why this way and not a torch extension: a kernel here is one C file with no torch or Python headers, so
the system C compiler builds it in well under a second, for the CPU at hand (`-march=native`), into a
temporary directory: nothing is cached, so nothing can go stale or be loaded on the wrong CPU. The
compiler is the one Inductor needs for the compiled decode step anyway. Where there is none, or the
build fails, the caller keeps its torch path and logs why (`NativeBuildError`'s message).

The compiled decode step calls two of them 150 times a token, as torch operators. Those operators are one
small C++ file (kernels/torch_ops.cpp) against torch's stable C ABI, handed the kernels' addresses: ~1.6 us
a call where a Python implementation took ~7 (one-stream decode ~96 -> ~112 tok/s served, Zen 4). It is
the one library kept between runs (`cxx_operators` says why that is safe); where it cannot be built, the
operators are Python functions (`define_operator`) and the log says why.

ctypes releases the GIL for a call through the CDLL `load_kernel` returns, so the event loop keeps serving
while a long kernel runs (the head); `holding_the_gil` gives the short ones (an operator inside the compiled
step: 150 calls a token) a handle that keeps it, since each release let a waiting thread in. Kernels are
built with -fopenmp: torch's wheel ships libgomp.so.1 and the loader hands our library that same copy
(one soname, loaded once), so a kernel's threads are torch's own pool, already awake from the ops before
it (threads of our own had to wait for those to stop spinning: one-row step 14.7 -> 13.2 ms, Zen 4).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

KERNEL_DIR = Path(__file__).parent / "kernels"
BUILD_TIMEOUT_S = 120


class NativeBuildError(RuntimeError):
    """A kernel could not be built or loaded here; the message says why."""


def c_compiler() -> str | None:
    """$CC, else the first of cc, gcc, clang on PATH (None: no compiler)."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def isa_flags() -> tuple[str, ...]:
    """This CPU's instruction set, capped at the one torch dispatches to: so `ATEN_CPU_CAPABILITY=avx2`
    (what CI uses to run an AVX2-only CPU's path on a newer one) builds our kernels' AVX2 variant too."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX2":
        return ("-march=native", "-mno-avx512f")
    if capability == "DEFAULT":
        return ("-march=native", "-mno-avx512f", "-mno-avx2")
    return ("-march=native",)


@functools.cache
def load_kernel(name: str, flags: tuple[str, ...] | None = None) -> ctypes.CDLL:
    """model/kernels/<name>.c built for this CPU and loaded (once per process and flags).

    Raises NativeBuildError with the reason when there is no compiler or the build fails.
    """
    source = KERNEL_DIR / f"{name}.c"
    compiler = c_compiler()
    if compiler is None:
        raise NativeBuildError("no C compiler on PATH (cc, gcc or clang; $CC)")
    with tempfile.TemporaryDirectory(prefix="llamaserve-kernel-") as directory:
        library = Path(directory) / f"{name}.so"
        command = [compiler, "-O3", *(flags if flags is not None else isa_flags()), "-shared", "-fPIC", "-fopenmp"]
        run_compiler([*command, "-o", str(library), str(source)])
        try:
            return ctypes.CDLL(str(library))  # mapped: the file may go with the directory
        except OSError as e:
            raise NativeBuildError(f"built {library.name} but could not load it: {e}") from e


def run_compiler(command: list[str]) -> None:
    """Run a compiler command line; NativeBuildError with the command and its last errors if it fails."""
    try:
        built = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBuildError(f"{' '.join(command)}: {e}") from e
    if built.returncode != 0:
        raise NativeBuildError(f"{' '.join(command)} failed: {built.stderr.strip()[-400:]}")


def wanted(env: str) -> bool:
    """Whether $env (auto | torch) lets one of our kernels replace torch's path: `torch` keeps torch's, to
    compare the two or to run torch's path on a CPU that has ours."""
    choice = os.environ.get(env, "auto").strip().lower()
    if choice not in ("auto", "torch"):
        raise ValueError(f"${env} must be auto or torch, got {choice!r}")
    return choice == "auto"


def holding_the_gil(library: ctypes.CDLL) -> ctypes.PyDLL:
    """The same loaded library, its functions called without releasing the GIL: for calls of tens of
    microseconds, each release is a chance for another thread (the server's event loop) to take the GIL
    and the caller to wait for it back."""
    return ctypes.PyDLL(library._name, handle=library._handle)


_registrations: list[torch.library.Library] = []  # an operator lives as long as its Library object

OPERATORS_ENV = "LLAMASERVE_OPERATORS"  # auto (C++ where it builds) | python


def cxx_compiler() -> str | None:
    """$CXX, else the first of c++, g++, clang++ on PATH (None: no compiler)."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


@functools.cache
def cxx_operators() -> ctypes.CDLL:
    """model/kernels/torch_ops.cpp built against torch's stable C ABI and loaded: it registers the
    operators llamaserve_c::int4_gemm and ::decode_attention, whose kernels `bind_cxx_operator` hands it.

    Once per process (an operator library cannot be loaded twice). Unlike the kernels, the library is kept
    between runs, beside the compiled decode step in Inductor's cache directory ($TORCHINDUCTOR_CACHE_DIR;
    the server points it into its --cache-dir): its build takes ~1.5 s of a ~15 s start, and it holds no
    code for a particular CPU (no -march) or torch build (the stable ABI), so it cannot go stale except by
    its source, torch's version or the compiler changing, which its file name hashes. Raises
    NativeBuildError with the reason where there is no C++ compiler, torch's headers are missing, or the
    build fails; callers then keep operators implemented in Python (`define_operator`).
    """
    compiler = cxx_compiler()
    if compiler is None:
        raise NativeBuildError("no C++ compiler on PATH (c++, g++ or clang++; $CXX)")
    torch_dir = Path(torch.__file__).parent
    if not (torch_dir / "include" / "torch" / "csrc" / "stable" / "library.h").is_file():
        raise NativeBuildError(f"torch {torch.__version__} has no stable C ABI headers in {torch_dir / 'include'}")
    source = KERNEL_DIR / "torch_ops.cpp"
    identity = [source.read_bytes(), torch.__version__.encode(), compiler.encode(), str(os.stat(compiler).st_mtime_ns).encode()]
    key = hashlib.sha256(b"\0".join(identity))
    library = _operator_cache_dir() / f"torch_ops-{key.hexdigest()[:16]}.so"
    if not library.is_file():
        with tempfile.TemporaryDirectory(prefix="llamaserve-operators-", dir=library.parent) as directory:
            built = Path(directory) / library.name
            command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{torch_dir / 'include'}"]
            run_compiler([*command, "-o", str(built), str(source), f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10"])
            os.replace(built, library)  # whole or not at all, should another process build it too
    try:
        return ctypes.CDLL(str(library))  # loading registers the operators
    except OSError as e:
        raise NativeBuildError(f"built {library} but could not load it: {e}") from e


def _operator_cache_dir() -> Path:
    """Where Inductor keeps its compiled code, llamaserve/ within (a temporary one where that cannot be written)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    directory = Path(cache_dir()) / "llamaserve"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return directory
    except OSError:
        return Path(tempfile.mkdtemp(prefix="llamaserve-operators-"))


def bind_cxx_operator(name: str, kernel: Any, shape_only: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """torch.ops.llamaserve_c.<name>: torch_ops.cpp's operator calling `kernel` (a ctypes function of a
    library `load_kernel` built), `shape_only` for the compiler's fake tensors. Call once per name
    (callers cache). Raises NativeBuildError where the C++ operators cannot be had or $LLAMASERVE_OPERATORS
    is `python`.
    """
    choice = os.environ.get(OPERATORS_ENV, "auto").strip().lower()
    if choice not in ("auto", "python"):
        raise ValueError(f"${OPERATORS_ENV} must be auto or python, got {choice!r}")
    if choice == "python":
        raise NativeBuildError(f"${OPERATORS_ENV}=python")
    operators = cxx_operators()
    if operators.llamaserve_bind(name.encode(), ctypes.cast(kernel, ctypes.c_void_p)) != 0:
        raise NativeBuildError(f"torch_ops.cpp has no operator {name}")
    namespace = torch.library.Library("llamaserve_c", "FRAGMENT")
    torch.library.register_fake(f"llamaserve_c::{name}", shape_only, lib=namespace)
    _registrations.append(namespace)
    return getattr(torch.ops.llamaserve_c, name).default


def define_operator(
    name: str, schema: str, kernel: Callable[..., torch.Tensor], shape_only: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """torch.ops.llamaserve.<name>: `kernel` on CPU tensors, `shape_only` for the compiler's fake tensors.

    A torch operator rather than a Python call, so a compiled graph calls it from inside (a ctypes call in
    the forward would break the graph); torch.library.Library rather than custom_op: ~2 us less a call.
    Call once per name (callers cache): nothing is registered at import.
    """
    namespace = torch.library.Library("llamaserve", "FRAGMENT")
    namespace.define(f"{name}{schema}")
    namespace.impl(name, kernel, "CPU")
    torch.library.register_fake(f"llamaserve::{name}", shape_only, lib=namespace)
    _registrations.append(namespace)
    return getattr(torch.ops.llamaserve, name).default


def kernel_operator(
    name: str, schema: str, kernel: Any, in_python: Callable[..., torch.Tensor], shape_only: Callable[..., torch.Tensor]
) -> tuple[Callable[..., torch.Tensor], str]:
    """(operator, how it is called): `kernel` (a ctypes function) as torch_ops.cpp's C++ operator
    (`bind_cxx_operator`), else `in_python` (calling the same kernel) as a Python one (`define_operator`,
    with `schema`), the reason in the description. Call once per name (callers cache)."""
    try:
        return bind_cxx_operator(name, kernel, shape_only), "C++ operator"
    except NativeBuildError as e:
        return define_operator(name, schema, in_python, shape_only), f"Python operator: {e}"
