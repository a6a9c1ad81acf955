"""Small C kernels of our own (model/kernels/*.c), built when a model loads and called through ctypes.

Why this way and not a torch extension: a kernel here is one C file with no torch or Python headers, so
the system C compiler builds it in well under a second, for the CPU at hand (`-march=native`), into a
temporary directory: nothing is cached, so nothing can go stale or be loaded on the wrong CPU. The
compiler is the one Inductor needs for the compiled decode step anyway. Where there is none, or the
build fails, the caller keeps its torch path and logs why (`NativeBuildError`'s message).

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
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

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
        command += ["-o", str(library), str(source)]
        try:
            built = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NativeBuildError(f"{' '.join(command)}: {e}") from e
        if built.returncode != 0:
            raise NativeBuildError(f"{' '.join(command)} failed: {built.stderr.strip()[-400:]}")
        try:
            return ctypes.CDLL(str(library))  # mapped: the file may go with the directory
        except OSError as e:
            raise NativeBuildError(f"built {library.name} but could not load it: {e}") from e


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
