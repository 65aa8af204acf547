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
import torch
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


def _linear_axis(t: torch.Tensor, axis: int, n_out: int, step: float) -> torch.Tensor:
    coords = torch.arange(n_out, dtype=torch.float64) * step
    n_in = t.shape[axis]
    lo = torch.clamp(torch.floor(coords).long(), 0, n_in - 1)
    hi = torch.clamp(lo + 1, 0, n_in - 1)
    w = (coords - lo.double()).to(t.dtype)
    shape = [1, 1, 1]
    shape[axis] = n_out
    w = w.reshape(shape)
    a = torch.index_select(t, axis, lo)
    b = torch.index_select(t, axis, hi)
    return torch.lerp(a, b, w)


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
        t = torch.from_numpy(np.ascontiguousarray(arr))
        arr = _linear_axis(t, axis, shape_out[axis], steps[axis]).numpy()
    return np.ascontiguousarray(arr), new_affine
