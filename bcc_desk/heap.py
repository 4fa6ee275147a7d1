"""The C heap's handling of freed memory, tuned for batch after batch of the same shapes."""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


@functools.cache  # process-wide: once is enough
def keep_freed_memory() -> bool:
    """Let glibc keep the memory a batch frees for the next batch, instead of handing it back to
    the system and page-faulting it in again (tens of MB per batch).

    glibc tunes these two thresholds itself, but only up to the largest block freed so far: a
    fresh process running a compiled network took 5,000-10,000 page faults per batch and ran ~7%
    slower than a warmed-up one (bench/RESULTS.md).  These are the values its own tuning reaches
    on at most (mmap threshold at its 32 MB ceiling, trim threshold twice that).  A no-op
    (False) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; musl has no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
