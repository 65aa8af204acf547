"""Resample a volume to a target spacing, one axis at a time.

Why separable and linear: along an axis that is *down*-sampled we first apply
a Gaussian anti-aliasing filter (sigma = (factor - 1) / 2 voxels, the rule
scikit-image uses), then linear interpolation; along an axis that is
*up*-sampled (the 5 mm slice axis of anisotropic scans) plain linear
interpolation, which cannot ring (no overshoot beyond the neighbouring
values) and blurs nothing across slices beyond the interpolation itself.
nnU-Net's default (cubic spline in-plane, nearest out-of-plane) rings at
edges and aliases when down-sampling; `bench/prepare.py` measures both.

The output grid keeps the first voxel centre and has exactly the target
spacing, so the new affine is exact.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def output_shape(shape: tuple[int, ...], spacing, target) -> tuple[int, int, int]:
    """Voxels per axis that cover the same extent at the target spacing (first centre kept)."""
    return tuple(
        int(np.floor((n - 1) * s / t + 1e-6)) + 1
        for n, s, t in zip(shape, spacing, target, strict=True)
    )


def _axis_order(spacing, target) -> list[int]:
    # Shrink first: the later passes then touch fewer voxels.
    return sorted(range(3), key=lambda a: spacing[a] / target[a])


def _nearest_axis(arr: np.ndarray, axis: int, n_out: int, step: float) -> np.ndarray:
    idx = np.clip(np.round(np.arange(n_out) * step).astype(np.int64), 0, arr.shape[axis] - 1)
    return np.take(arr, idx, axis=axis)


def _linear_axis(arr: np.ndarray, axis: int, n_out: int, step: float) -> np.ndarray:
    """Linear interpolation along one axis at positions ``j * step``.

    The axis is moved to the front and made contiguous so each gather is a
    copy of whole slabs (memcpy speed), not a strided gather.
    """
    front = np.ascontiguousarray(np.moveaxis(arr, axis, 0))
    coords = np.arange(n_out, dtype=np.float64) * step
    lo = np.clip(np.floor(coords).astype(np.int64), 0, front.shape[0] - 1)
    hi = np.minimum(lo + 1, front.shape[0] - 1)
    w = (coords - lo).astype(np.float32).reshape(-1, 1, 1)
    out = front[hi]
    out -= front[lo]
    out *= w
    out += front[lo]
    return np.moveaxis(out, 0, axis)


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    target: tuple[float, float, float],
    *,
    is_label: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``data`` (with voxel->world ``affine``) to ``target`` spacing.

    Images: anti-aliased linear. Labels (``is_label=True``): nearest neighbour, dtype kept.
    Returns the new array and its affine.
    """
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    shape_out = output_shape(data.shape, spacing, target)
    steps = [t / s for s, t in zip(spacing, target, strict=True)]
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * np.asarray(steps)
    if all(abs(s - 1.0) < 1e-6 for s in steps):
        return data, new_affine
    arr = data if is_label else data.astype(np.float32, copy=False)
    for axis in _axis_order(spacing, target):
        if abs(steps[axis] - 1.0) < 1e-6:
            continue
        if is_label:
            arr = _nearest_axis(arr, axis, shape_out[axis], steps[axis])
            continue
        if steps[axis] > 1.0:
            arr = ndimage.gaussian_filter1d(
                arr, sigma=(steps[axis] - 1.0) / 2.0, axis=axis, mode="nearest", truncate=3.0
            )
        arr = _linear_axis(arr, axis, shape_out[axis], steps[axis])
    return np.ascontiguousarray(arr), new_affine
