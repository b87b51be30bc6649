"""Process-wide memory settings for fast CPU force calls: an explicit choice.

Importing pes_calc changes nothing outside it. `reuse_freed_memory` is what the
``pes-calc`` commands and scripts/benchmark.py turn on, and what a Python user may
call first thing in a script. Why: a force call allocates and frees the same large
per-edge tensors on every step. By default glibc serves blocks over 32 MB by
``mmap`` and returns them on free, so each step gets fresh pages, and zero-filling
them cost more than the arithmetic: NequIP's AOTInductor graph at 2048 Cu atoms
took 11.2 s per call with fresh pages and 5.2 s when freed memory was reused. The
price is peak memory (README, "Memory settings").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["REUSE_FREED_MEMORY", "freed_memory_reused", "reuse_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# set to 0 to make reuse_freed_memory (and so the pes-calc commands) a no-op
REUSE_FREED_MEMORY = "PES_CALC_REUSE_FREED_MEMORY"
_applied = False


def freed_memory_reused() -> bool:
    """Whether `reuse_freed_memory` has changed this process's malloc."""
    return _applied


def reuse_freed_memory(huge_pages: bool = True) -> bool:
    """Keep freed memory for reuse: serve large blocks from the heap and never
    return the heap's top (glibc only), and, with ``huge_pages``, put torch's large
    CPU tensors on transparent huge pages.

    What a force call frees is reused by the next one, as with jemalloc or
    tcmalloc. The cost is fragmentation: peak memory 1.5-2.5x higher for eager and
    TorchScript models, 1.0-1.9x for AOTInductor packages. It affects every
    library in the process, which is why pes_calc never does it at import. Call
    it before the first large tensor exists (torch reads THP_MEM_ALLOC_ENABLE once,
    at its first allocation of 2 MB or more). A user's own THP_MEM_ALLOC_ENABLE is
    kept; ``PES_CALC_REUSE_FREED_MEMORY=0`` makes this a no-op. Returns whether the
    malloc setting is in effect.
    """
    global _applied
    if _applied or os.environ.get(REUSE_FREED_MEMORY, "1") == "0":
        return _applied
    if huge_pages:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # never mmap (so never unmap) a block; never give the heap's top back either (-1:
    # no trimming; a finite threshold, even 2 GB, gave NequIP at 2048 atoms 8.4 s)
    _applied = mallopt(_M_MMAP_MAX, 0) == 1
    _applied = mallopt(_M_TRIM_THRESHOLD, -1) == 1 and _applied
    return _applied
