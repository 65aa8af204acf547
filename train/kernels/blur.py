"""Separable filter of a 3-D volume with replicate borders, compiled for the CPU.

Three 1-D passes, each with a contiguous inner loop that vectorises: along x and y as
shifted whole rows of the (already filtered) source, the border rows chosen by clamping
the row index (no per-voxel branch); along z (the contiguous axis) each row is copied
into a padded buffer (its ends replicated), so every output voxel is the same tap loop.
The z pass works in place, which lets the whole filter write into its input: one
temporary volume instead of two, no copy back.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit


@njit(cache=True, nogil=True)
def _filter_rows(src, dst, taps):  # pragma: no cover - compiled
    """``dst[a, i, :] = sum_t taps[t] * src[a, clamp(i + t - r), :]`` on (outer, n, inner)."""
    outer, n, inner = src.shape
    r = taps.size // 2
    for a in range(outer):
        for i in range(n):
            d = dst[a, i]
            s = src[a, min(max(i - r, 0), n - 1)]
            k0 = taps[0]
            for b in range(inner):
                d[b] = k0 * s[b]
            for t in range(1, taps.size):
                s = src[a, min(max(i + t - r, 0), n - 1)]
                kt = taps[t]
                for b in range(inner):
                    d[b] += kt * s[b]


@njit(cache=True, nogil=True)
def _filter_lines(vol, taps):  # pragma: no cover - compiled
    """In place: ``vol[a, i] = sum_t taps[t] * vol[a, clamp(i + t - r)]`` on (outer, n)."""
    outer, n = vol.shape
    size = taps.size
    r = size // 2
    pad = np.empty(n + 2 * r, vol.dtype)
    for a in range(outer):
        line = vol[a]
        for i in range(r):
            pad[i] = line[0]
            pad[n + r + i] = line[n - 1]
        pad[r : r + n] = line
        k0 = taps[0]
        for i in range(n):
            line[i] = k0 * pad[i]
        for t in range(1, size):
            kt = taps[t]
            p = pad[t : t + n]
            for i in range(n):
                line[i] += kt * p[i]


def filter_volume(
    vol: torch.Tensor, taps: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The (X,Y,Z) float32 CPU ``vol`` filtered by the odd-length ``taps`` along each axis,
    written into ``out`` (a new tensor if None; ``vol`` itself to filter in place)."""
    if vol.dtype != torch.float32 or taps.dtype != torch.float32:
        raise TypeError(f"need float32 volume and taps, got {vol.dtype}, {taps.dtype}")
    if vol.device.type != "cpu" or taps.device.type != "cpu":
        raise ValueError("CPU tensors only")
    if vol.dim() != 3 or taps.dim() != 1 or taps.numel() % 2 != 1:
        raise ValueError(
            f"need a 3-D volume and odd 1-D taps, got {tuple(vol.shape)}, {tuple(taps.shape)}"
        )
    if out is None:
        out = torch.empty_like(vol, memory_format=torch.contiguous_format)
    elif out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise TypeError("out must be a contiguous float32 CPU tensor")
    elif out.shape != vol.shape:
        raise ValueError(f"out {tuple(out.shape)} is not the volume's {tuple(vol.shape)}")
    src = vol.contiguous().numpy()
    k = taps.contiguous().numpy()
    X, Y, Z = src.shape
    tmp = np.empty_like(src)
    res = out.numpy()
    _filter_rows(src.reshape(1, X, Y * Z), tmp.reshape(1, X, Y * Z), k)
    _filter_rows(tmp, res, k)  # reads only tmp: ``res`` may be the input itself
    _filter_lines(res.reshape(X * Y, Z), k)
    return out
