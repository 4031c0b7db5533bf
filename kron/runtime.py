"""Process set-up shared by kron's entrypoints (``kron.train``, ``kron.bench``, ``kron-tables``).

The allocator: glibc serves every block above its mmap threshold (128 KiB, adaptively raised up
to 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``. A layer that allocates
a 32 MB intermediate per call then pays the page faults of 8,192 fresh pages on every call
(about 9 ms here), and how often that happens depends on what the process did before (the
adaptive threshold moves). :func:`configure_allocator` makes it deterministic: large blocks come
from the heap and freed memory is kept for reuse, the same effect as starting Python with
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` raised. Where jemalloc or tcmalloc is
preloaded (``LD_PRELOAD``), glibc's settings do not apply and nothing is changed. See
docs/design.md, "Process set-up".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for reuse
_TOP_PAD = 64 * 1024 * 1024  # grow the heap in 64 MiB steps

_configured: str | None = None


def _preloaded_allocator() -> str | None:
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return name
    return None


def configure_allocator() -> str:
    """Set up the process allocator once (idempotent) and say what was done, in one line.

    On glibc: ``mallopt`` raises the mmap threshold to its maximum (32 MiB) and the trim
    threshold to 1 GiB, so per-call intermediates are recycled from the heap instead of being
    mapped and unmapped on each call. Elsewhere (macOS, Windows, a preloaded jemalloc/tcmalloc)
    it changes nothing and says so.
    """
    global _configured
    if _configured is not None:
        return _configured
    preloaded = _preloaded_allocator()
    if preloaded:
        _configured = f"allocator: {preloaded} (LD_PRELOAD), left as it is"
        return _configured
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _configured = "allocator: platform default (not glibc), left as it is"
        return _configured
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, _TOP_PAD),
        )
    )
    _configured = (
        "allocator: glibc, mmap threshold 32 MiB, trim threshold 1 GiB (freed blocks reused)"
        if ok else "allocator: glibc rejected mallopt settings; left at its defaults"
    )
    return _configured
