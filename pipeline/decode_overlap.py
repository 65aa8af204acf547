"""Lend one core from torch's thread pool to a background decode, only while it runs.

The decoder thread (`pipeline.gzip_stream`) needs a core of its own for decoding
and resampling to overlap; with every core in torch's pool the two only take
turns (decode + resample of a 512x512x300 CT: 0.91 s with every core in the pool,
0.73 s with one lent). Once the last byte is decoded the core goes back, so the rest
of the resampling (e.g. the slice-axis pass) runs on the full pool.

torch's thread count is process-wide, so concurrent scans (thread workers of a
flow) share one reduction: a counter under a lock; the last one out restores it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

_lock = threading.Lock()
_users = 0
_saved = 0


def _lend() -> None:
    global _users, _saved
    with _lock:
        if _users == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(max(1, _saved - 1))
        _users += 1


def _give_back() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            torch.set_num_threads(_saved)


class DecodeOverlap:
    """Context manager whose ``wait(nbytes)`` wraps a reader's wait and returns the core early.

    ``total`` is the number of bytes the reader decodes; ``active=False`` (nothing
    decoding in the background) makes it a plain pass-through.
    """

    def __init__(self, wait: Callable[[int | None], None], total: int, active: bool) -> None:
        self._wait = wait
        self._total = total
        self._active = active
        self._lent = False

    def __enter__(self) -> DecodeOverlap:
        if self._active:
            _lend()
            self._lent = True
        return self

    def _return(self) -> None:
        if self._lent:
            self._lent = False
            _give_back()

    def wait(self, nbytes: int | None = None) -> None:
        self._wait(nbytes)
        if nbytes is None or nbytes >= self._total:
            self._return()  # decoding is over: the whole pool for what follows

    def __exit__(self, *exc) -> None:
        self._return()
