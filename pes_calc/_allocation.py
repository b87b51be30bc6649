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


def reuse_freed_memory(by_default: bool) -> bool:
    """Serve large blocks from the heap and keep freed memory mapped (glibc only),
    unless PES_CALC_REUSE_FREED_MEMORY says otherwise (1: on, 0: off); ``by_default``
    decides when it is unset.

    The process then keeps its peak memory mapped instead of returning it after each
    call, as jemalloc or tcmalloc would, and what a call frees is reused by the next
    one. The cost is fragmentation: eager models, which allocate many sizes, peaked
    1.7x higher (Allegro at 16384 atoms: 21 GB instead of 12.7 GB); AOTInductor
    graphs, which plan their buffers, 1.1-1.25x. Hence on by default only where an
    AOTInductor package runs on the CPU. Returns whether the setting is in effect.
    """
    global applied
    told = os.environ.get(REUSE_FREED_MEMORY)
    if applied or not (by_default if told is None else told != "0"):
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
