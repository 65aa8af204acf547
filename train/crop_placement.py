"""Where a pair's two crops lie in a scan.

The reference box is centred near an anchor and the query box shifted from it by at most
``crop * (1 - min_overlap)`` per axis (``crop_starts``), or placed beside it without overlap
(``disjoint_query_start``, for pairs whose structures are absent from the query). Each box
is read ``margin`` voxels wider per side; ``PairBoxes`` holds both padded boxes, where they
fall in the scan and in their crops, and the union read once for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from maskbank.train.run_config import DataConfig


def crop_starts(
    rng: np.random.Generator, shape: tuple[int, ...], centre: np.ndarray, cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Starts of the reference and query ``crop``^3 boxes (may extend past small volumes).

    The reference box is centred near ``centre`` and kept inside the volume where
    the volume is large enough; the query box is shifted by at most
    ``crop * (1 - min_overlap)`` per axis, so the two overlap >= min_overlap per axis.
    """
    c = cfg.crop
    shape_a = np.asarray(shape)
    max_shift = int(math.floor(c * (1 - cfg.min_overlap) + 1e-9))

    def place(start: np.ndarray) -> np.ndarray:
        # Inside the volume when it fits, centred on it when it does not.
        return np.where(shape_a >= c, np.clip(start, 0, shape_a - c), (shape_a - c) // 2)

    ref = place(np.round(centre - c / 2).astype(np.int64))
    shift = rng.integers(-max_shift, max_shift + 1, size=3)
    query = place(ref + shift)
    return ref, query


def disjoint_query_start(
    rng: np.random.Generator, shape: tuple[int, ...], ref: np.ndarray, cfg: DataConfig
) -> np.ndarray:
    """Start of a query box beside the reference box, not overlapping it where the scan has room.

    Inference slides windows over whole scans, most of them away from the structure; this
    box sits past one face of the reference (a gap of up to ``crop // 2``), on the first axis
    (in a random order) with room for a whole crop on a random side, and is shifted as an
    overlapping query would be on the others. Without room anywhere (a scan under two crops
    per axis), it lies as far from the reference as the scan allows on a random axis.
    """
    c = cfg.crop
    shape_a = np.asarray(shape)
    max_shift = int(math.floor(c * (1 - cfg.min_overlap) + 1e-9))
    start = ref + rng.integers(-max_shift, max_shift + 1, size=3)
    start = np.where(shape_a >= c, np.clip(start, 0, np.maximum(shape_a - c, 0)), start)
    gap = int(rng.integers(0, c // 2 + 1))
    axes = rng.permutation(3)
    sides = rng.permutation([-1, 1])
    for axis in axes:
        for side in sides:
            if side > 0 and shape_a[axis] - (ref[axis] + c) >= c:
                start[axis] = min(ref[axis] + c + gap, shape_a[axis] - c)
                return start
            if side < 0 and ref[axis] >= c:
                start[axis] = max(ref[axis] - c - gap, 0)
                return start
    axis = axes[0]
    start[axis] = max(shape_a[axis] - c, 0) if 2 * ref[axis] < shape_a[axis] - c else 0
    return start


def padded_roi(start: np.ndarray, size: int, shape: tuple[int, ...]):
    """ROI clipped to the volume plus where it lands in the padded ``size``^3 box."""
    src, dst = [], []
    for s, n in zip(start.tolist(), shape, strict=True):
        lo, hi = max(s, 0), min(s + size, n)
        hi = max(hi, lo)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    return tuple(src), tuple(dst)


def within(inner, outer) -> tuple[slice, ...]:
    """``inner`` (absolute slices) relative to the block read for ``outer``."""
    return tuple(
        slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer, strict=True)
    )


@dataclass(frozen=True)
class PairBoxes:
    """A pair's two padded read boxes: where each lies in the scan (``*_src``, clipped) and
    in its read_size^3 crop (``*_dst``), and their union, read once for both."""

    ref_start: np.ndarray
    query_start: np.ndarray
    ref_src: tuple[slice, ...]
    ref_dst: tuple[slice, ...]
    query_src: tuple[slice, ...]
    query_dst: tuple[slice, ...]
    union: tuple[slice, ...]

    @classmethod
    def around(
        cls, ref0: np.ndarray, q0: np.ndarray, cfg: DataConfig, shape: tuple[int, ...]
    ) -> PairBoxes:
        """The boxes of the crops starting at ``ref0`` and ``q0``, ``margin`` wider per side."""
        ref_start, q_start = ref0 - cfg.margin, q0 - cfg.margin
        ref_src, ref_dst = padded_roi(ref_start, cfg.read_size, shape)
        q_src, q_dst = padded_roi(q_start, cfg.read_size, shape)
        # One read of the union box serves both crops (they overlap >= min_overlap per axis).
        union = tuple(
            slice(min(r.start, q.start), max(r.stop, q.stop))
            for r, q in zip(ref_src, q_src, strict=True)
        )
        return cls(ref_start, q_start, ref_src, ref_dst, q_src, q_dst, union)

    @property
    def union_shape(self) -> tuple[int, ...]:
        return tuple(u.stop - u.start for u in self.union)

    def padded(self, size: int) -> bool:
        """Whether either crop reaches outside the scan (then it needs a fill value)."""
        return any(d.start > 0 or d.stop < size for d in (*self.ref_dst, *self.query_dst))

    def crops(self, kind: str) -> tuple[tuple[str, tuple[slice, ...], tuple[slice, ...]], ...]:
        """``(output key, src, dst)`` of the reference and query crops of ``kind``."""
        return (
            (f"ref_{kind}", self.ref_src, self.ref_dst),
            (f"query_{kind}", self.query_src, self.query_dst),
        )
