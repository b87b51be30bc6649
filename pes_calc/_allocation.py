"""Process-wide memory settings for fast CPU force calls, each with an opt-out.

A force call allocates and frees the same large per-edge tensors on every step. By
default the kernel hands each of them fresh pages (glibc serves blocks over 32 MB by
``mmap`` and returns them on free), and zero-filling those pages cost more than the
arithmetic: NequIP's AOTInductor graph at 2048 Cu atoms took 11.2 s per call with
fresh pages and 5.2 s when freed memory was reused (see `reuse_freed_memory`).
"""

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
REUSE_FREED_MEMORY = "PES_CALC_REUSE_FREED_MEMORY"
applied = False  # whether reuse_freed_memory has changed this process's malloc


def use_huge_pages() -> None:
    """Large torch tensors on transparent huge pages (opt out: THP_MEM_ALLOC_ENABLE=0).

    PyTorch reads the variable once, at its first large (≥ 2 MB) CPU allocation, so
    it counts when pes_calc is imported before any big tensor exists; first touch of
    a large tensor is then up to 3x cheaper.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def reuse_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed memory mapped (glibc only;
    opt out: PES_CALC_REUSE_FREED_MEMORY=0).

    What a force call frees is reused by the next one, as with jemalloc or tcmalloc,
    and the process keeps its peak memory mapped instead of returning it. The cost is
    fragmentation: peak memory 1.5-2.5x higher for eager and TorchScript models,
    1.0-1.9x for AOTInductor packages (Allegro eager at 16384 Cu atoms: 12-16 instead
    of 8.1 GB, for 14 instead of 25 s per call; README, Speed). Returns whether the
    setting is in effect.
    """
    global applied
    if applied or os.environ.get(REUSE_FREED_MEMORY, "1") == "0":
        return applied
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
    applied = mallopt(_M_MMAP_MAX, 0) == 1
    applied = mallopt(_M_TRIM_THRESHOLD, -1) == 1 and applied
    return applied
