"""Label-map loops of the sampler (``train.crop_masks``), compiled for the CPU.

Why: both read a strided view of a decoded chunk in place (no copy): the histogram ~2x
faster than torch's ``bincount`` of a copy, the lookup ~5x faster than numpy's
``dst |= lut[src]`` (one pass, no temporary).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _histogram(labels, nbins):  # pragma: no cover - compiled
    """Four interleaved int32 sub-histograms (runs of one label would otherwise chain every
    increment on one counter); returns (histogram, number of labels outside [0, nbins))."""
    sub = np.zeros((4, nbins), np.int32)
    bad = 0
    n0, n1, n2 = labels.shape
    for i in range(n0):
        for j in range(n1):
            row = labels[i, j]
            k = 0
            while k + 4 <= n2:
                v0, v1, v2, v3 = row[k], row[k + 1], row[k + 2], row[k + 3]
                if (0 <= v0 < nbins) & (0 <= v1 < nbins) & (0 <= v2 < nbins) & (0 <= v3 < nbins):
                    sub[0, v0] += 1
                    sub[1, v1] += 1
                    sub[2, v2] += 1
                    sub[3, v3] += 1
                    k += 4
                    continue
                for q in range(k, k + 4):
                    if 0 <= row[q] < nbins:
                        sub[0, row[q]] += 1
                    else:
                        bad += 1
                k += 4
            for q in range(k, n2):
                if 0 <= row[q] < nbins:
                    sub[0, row[q]] += 1
                else:
                    bad += 1
    hist = np.zeros(nbins, np.int64)
    for s in range(4):
        for v in range(nbins):
            hist[v] += sub[s, v]
    return hist, bad


@njit(cache=True, nogil=True)
def _or_lookup(src, lut, dst):  # pragma: no cover - compiled
    """``dst |= lut[src]``; returns the number of labels outside the table (left unchanged)."""
    bad = 0
    n0, n1, n2 = src.shape
    nlut = lut.size
    for i in range(n0):
        for j in range(n1):
            a, b = src[i, j], dst[i, j]
            for k in range(n2):
                v = a[k]
                if 0 <= v < nlut:
                    b[k] |= lut[v]
                else:
                    bad += 1
    return bad


def _check_labels(name: str, a: np.ndarray) -> None:
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "ui":
        raise TypeError(
            f"{name} must be an integer numpy array, got {getattr(a, 'dtype', type(a))}"
        )
    if a.ndim != 3:
        raise ValueError(f"{name} must be 3-D, got shape {a.shape}")


def label_histogram(labels: np.ndarray, nbins: int) -> np.ndarray | None:
    """int64 voxel count of each label ``0..nbins-1`` of a 3-D integer view (any strides);
    None if some label lies outside ``[0, nbins)`` (the caller counts those its own way)."""
    _check_labels("labels", labels)
    if nbins <= 0:
        raise ValueError(f"nbins must be positive, got {nbins}")
    hist, bad = _histogram(labels, int(nbins))
    return None if bad else hist


def or_lookup(src: np.ndarray, lut: np.ndarray, dst: np.ndarray) -> None:
    """``dst |= lut[src]`` in place for 3-D integer views (any strides); ``lut`` 1-D of
    ``dst``'s dtype. A label outside the table raises ``IndexError`` (after the pass)."""
    _check_labels("src", src)
    _check_labels("dst", dst)
    if not isinstance(lut, np.ndarray) or lut.ndim != 1 or lut.dtype != dst.dtype:
        raise TypeError(f"lut must be 1-D of dst's dtype {dst.dtype}")
    if src.shape != dst.shape:
        raise ValueError(f"src {src.shape} and dst {dst.shape} differ")
    if not dst.flags.writeable:
        raise ValueError("dst is read-only")
    bad = _or_lookup(src, np.ascontiguousarray(lut), dst)
    if bad:
        raise IndexError(f"{bad} labels outside the lookup table of {len(lut)} entries")
