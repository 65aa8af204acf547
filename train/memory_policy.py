"""The process-wide allocator policy of training processes: freed buffers stay in the heap."""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_RETAINED = False


def retain_freed_memory(max_block: int = 64 << 20) -> bool:
    """Keep freed blocks of up to ``max_block`` bytes in the process heap (glibc); True if set.

    Why: every pair allocates ~150 MB of crops, warped volumes and unpacked masks
    (blocks of 4-29 MB). glibc serves blocks above its mmap threshold (at most 32 MB,
    adaptive) with fresh ``mmap`` pages and returns them on ``free``, so every pair
    page-faults its buffers in again (~1 us per 4 KiB page, ~35 ms per pair). With the
    mmap threshold raised to ``max_block`` and trimming off, freed blocks are reused by
    the next pair. Costs: the heap keeps its peak size (a worker's working set, a few
    hundred MB). Process-wide; a no-op off glibc. Called by the trainer and by each
    DataLoader worker (``pair_sampler.make_loader``).
    """
    global _RETAINED
    if _RETAINED:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(max_block)) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _RETAINED = ok
    return ok
