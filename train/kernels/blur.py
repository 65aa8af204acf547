"""Separable filter of a 3-D volume with replicate borders, compiled for the CPU."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit


@njit(cache=True, nogil=True)
def _filter_axis(src, dst, taps):  # pragma: no cover - compiled
    """``dst[a, i, b] = sum_t taps[t] * src[a, clamp(i + t - r), b]`` on (outer, n, inner)."""
    outer, n, inner = src.shape
    r = taps.size // 2
    lo = min(r, n)
    hi = max(n - r, lo)
    rows_src, rows_dst = src.reshape(outer, n * inner), dst.reshape(outer, n * inner)
    for a in range(outer):
        if inner == 1:  # along the contiguous axis: the interior as shifted rows (vectorises)
            s, d = rows_src[a], rows_dst[a]
            for i in range(lo, hi):
                d[i] = 0.0
            for t in range(2 * r + 1):  # unsigned indices: no negative-index wraparound
                kt = taps[t]
                for i in range(np.uint64(lo), np.uint64(hi)):
                    d[i] += kt * s[i + np.uint64(t) - np.uint64(r)]
            for i in range(n):
                if lo <= i < hi:
                    continue
                acc = s.dtype.type(0.0)
                for t in range(-r, r + 1):
                    acc += taps[t + r] * s[min(max(i + t, 0), n - 1)]
                d[i] = acc
            continue
        for i in range(n):
            d = dst[a, i]
            d[:] = 0.0
            for t in range(-r, r + 1):
                s = src[a, min(max(i + t, 0), n - 1)]
                kt = taps[t + r]
                for b in range(inner):
                    d[b] += kt * s[b]


def filter_volume(vol: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The (X,Y,Z) float32 CPU ``vol`` filtered by the odd-length ``taps`` along each axis."""
    if vol.dtype != torch.float32 or taps.dtype != torch.float32:
        raise TypeError(f"need float32 volume and taps, got {vol.dtype}, {taps.dtype}")
    if vol.device.type != "cpu" or taps.device.type != "cpu":
        raise ValueError("CPU tensors only")
    if vol.dim() != 3 or taps.dim() != 1 or taps.numel() % 2 != 1:
        raise ValueError(
            f"need a 3-D volume and odd 1-D taps, got {tuple(vol.shape)}, {tuple(taps.shape)}"
        )
    a = vol.contiguous().numpy()
    k = taps.contiguous().numpy()
    X, Y, Z = a.shape
    b, c = np.empty_like(a), np.empty_like(a)
    _filter_axis(a.reshape(1, X, Y * Z), b.reshape(1, X, Y * Z), k)
    _filter_axis(b.reshape(X, Y, Z), c.reshape(X, Y, Z), k)
    _filter_axis(c.reshape(X * Y, Z, 1), b.reshape(X * Y, Z, 1), k)
    return torch.from_numpy(b)
