"""Keeping a long-running server's memory flat: a bounded oneDNN cache, freed heap pages given back.

Measured with bench/soak.py (streamed requests of random prompt lengths, 20% of clients leaving
mid-stream; SmolLM2-135M int4, 16 slots, 2 cores, Xeon): resident memory grew 10.2% after a warm-up
round (500 requests) and stayed there when idle. No Python object was retained; the growth was native:
- glibc keeps freed memory inside its per-thread arenas (the 64 MiB anonymous mappings the growth
  showed up in) until asked to trim: trimming when the engine goes idle took 10.2% to ~6.5%;
- oneDNN keeps a compiled primitive per distinct matmul shape (up to 1,024), and every new prompt
  length is a new shape for the dense prefill: capping the cache at 256 took ~6.5% to 4.3-5.0%
  (120-request soaks), with the same wall time (64 was 3x slower: decode shapes no longer fit).
(MKL_DISABLE_FAST_MM changed nothing measurable and is not set.)
Later (Zen 4, bf16 dense prefill weights): oneDNN's bf16 matmul kept ~1 MiB per distinct prefill row
count whatever its primitive cache capacity (even 0), so random prompt lengths grew memory without end
(+60 MiB per 64 requests at first). Prefill chunks now run on 32-row blocks (model/llama.py:
PREFILL_ROW_BLOCK): tests/test_soak.py measures -0.1% after warm-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Callable

log = logging.getLogger(__name__)

# Read once, when the libraries initialise (at `import torch` or their first use): set before that.
NATIVE_DEFAULTS = {
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256",  # every decode shape fits; prefill lengths cannot grow it for ever
}


def configure_memory() -> None:
    """Bound oneDNN's primitive cache (a value the user set wins). Call before torch is imported."""
    if "torch" in sys.modules:
        log.warning("torch was imported before configure_memory(): the oneDNN cache limit may not apply")
    for name, value in NATIVE_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim  # glibc only (musl and macOS have none)
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def trim_free_memory() -> bool:
    """Give the heap's free pages back to the OS (every glibc arena); False where there is no malloc_trim.

    Costs a few milliseconds, so the engine calls it only when it runs out of work.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
