"""Resample a volume to a target spacing: anti-aliased, separable, streamed in planes.

Why this way:

* **Anti-aliased linear, no ringing.** Along an axis that is *down*-sampled
  each output voxel is a triangle-weighted average of the input voxels within
  one output step (the "antialias" bilinear filter of PIL / torchvision); along
  an axis that is *up*-sampled (the 5 mm slice axis of anisotropic scans) it is
  plain linear interpolation. All weights are positive, so nothing overshoots
  the local input range. nnU-Net's default (cubic spline in-plane, nearest
  out-of-plane) rings at edges and aliases when down-sampling;
  `bench/prepare.py` measures both.
* **Fast.** The work is done by torch's vectorised separable kernel
  (``_upsample_bilinear2d_aa``, what ``F.interpolate(antialias=True)`` calls),
  first in the two in-memory-contiguous axes of each input plane, then across
  planes, on the already shrunk result. Input planes are cast to float32 a few
  at a time (cache-sized), so an int16 scan is never copied whole to float32.
* **Native order.** Resampling runs in the file's own voxel order (no copy to
  reorient first); reorient the much smaller output afterwards. Image and label
  maps of one scan therefore share exactly the same output grid.

Grid convention (the pixel-area one of torch, PIL and ITK's extent-preserving
resamplers): output voxel ``j`` sits at input index ``(j + 0.5) * step - 0.5``
along each axis, with ``step = target / spacing``, and there are
``floor(n / step)`` (at least 1) output voxels, so the output covers the input's
extent from its first edge. The returned affine is exact: its spacing is the
target spacing and its origin is the first output voxel's centre.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

_PLANES_PER_BLOCK = 8  # input planes cast + filtered together (a few MB: stays in cache)


def _steps(spacing, target) -> tuple[float, float, float]:
    steps = tuple(float(t) / float(s) for s, t in zip(spacing, target, strict=True))
    return tuple(1.0 if abs(s - 1.0) < 1e-6 else s for s in steps)  # type: ignore[return-value]


def output_shape(shape: tuple[int, ...], spacing, target) -> tuple[int, int, int]:
    """Voxels per axis at the target spacing: ``floor(n * spacing / target)``, at least 1."""
    return tuple(
        n if step == 1.0 else max(1, math.floor(n / step + 1e-6))
        for n, step in zip(shape, _steps(spacing, target), strict=True)
    )  # type: ignore[return-value]


def output_affine(affine: np.ndarray, spacing, target) -> np.ndarray:
    """Voxel->world affine of the resampled grid (first output centre at input index 0.5*step-0.5)."""
    steps = np.asarray(_steps(spacing, target))
    new = np.array(affine, dtype=np.float64, copy=True)
    new[:3, :3] = affine[:3, :3] * steps
    new[:3, 3] = affine[:3, :3] @ (0.5 * steps - 0.5) + affine[:3, 3]
    return new


def _aa(x: torch.Tensor, size: tuple[int, int], steps: tuple[float, float]) -> torch.Tensor:
    """Anti-aliased bilinear resize of (N, 1, H, W) to ``size`` with exact steps.

    ``F.interpolate`` cannot take both an output size and the scale that maps
    coordinates, so the aten op it dispatches to is called directly: the size
    is ours (``floor(n / step)``) and the mapping uses the exact step.
    """
    if tuple(x.shape[-2:]) == size and steps == (1.0, 1.0):
        return x
    return torch.ops.aten._upsample_bilinear2d_aa.default(
        x, list(size), False, 1.0 / steps[0], 1.0 / steps[1]
    )


def _to_float32(block: np.ndarray) -> np.ndarray:
    out = np.asarray(block, dtype=np.float32, order="C")
    return out if out.flags.writeable else out.copy()  # torch wants writable memory


@dataclass
class PlanePass:
    """A volume resampled along its two in-memory-contiguous axes, the slice axis still native.

    ``planes`` is ``(n_slices, a, b)`` float32 with the native axes ``order``;
    `finish` does the remaining pass across slices. Splitting the two lets a
    caller look at the coarser intermediate first (`pipeline.prepare` finds the
    body on the native slices of a 5 mm scan) and crop it before up-sampling.
    """

    planes: torch.Tensor
    order: tuple[int, int, int]
    step: float  # slice-axis step (target / spacing); < 1 means up-sampling
    n_out: int  # slice-axis length after `finish`
    affine: np.ndarray  # voxel->world of the intermediate grid (native axes)

    @property
    def slice_axis(self) -> int:
        return self.order[0]

    def native(self) -> np.ndarray:
        """The intermediate grid as an array with the input's axes (a view)."""
        return self.planes.numpy().transpose(np.argsort(self.order))

    def finish(self, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """Resample across slices; ``box`` (native axes) crops the in-plane axes first.

        The slice axis of ``box`` must be ``slice(None)``: a crop along it is the
        caller's, after this pass. Returns the input's axis order.
        """
        planes = self.planes
        if box is not None:
            if box[self.slice_axis] != slice(None):
                raise ValueError("crop the slice axis after the pass, not before")
            planes = planes[:, box[self.order[1]], box[self.order[2]]]
        if self.step != 1.0:
            n, a, b = planes.shape
            flat = planes.contiguous().reshape(1, 1, n, a * b)
            planes = _aa(flat, (self.n_out, a * b), (self.step, 1.0)).reshape(self.n_out, a, b)
        return planes.numpy().transpose(np.argsort(self.order))


def resample_planes(
    data: np.ndarray,
    affine: np.ndarray,
    target: tuple[float, float, float],
    *,
    wait: Callable[[int | None], None] | None = None,
) -> PlanePass:
    """First pass of `resample`: the two in-plane axes, block by block as ``data`` decodes."""
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    steps = _steps(spacing, target)
    shape_out = output_shape(data.shape, spacing, target)
    # Outer axis = the one with the largest stride: its planes are contiguous in memory.
    order = tuple(sorted(range(3), key=lambda a: -abs(data.strides[a])))
    view = data.transpose(order)
    if wait is not None and min(data.strides) <= 0:
        wait(None)  # memory not in plane order: wait for all of it
        wait = None
    outer_stride = view.strides[0]
    st = tuple(steps[a] for a in order)
    out_sz = tuple(shape_out[a] for a in order)
    n_outer = view.shape[0]
    if st[1:] != (1.0, 1.0):
        planes = torch.empty((n_outer, 1, out_sz[1], out_sz[2]), dtype=torch.float32)
        for start in range(0, n_outer, _PLANES_PER_BLOCK):
            stop = min(start + _PLANES_PER_BLOCK, n_outer)
            if wait is not None:  # the file is still decoding: wait for these planes only
                wait(stop * outer_stride)
            block = torch.from_numpy(_to_float32(view[start:stop]))
            planes[start : start + block.shape[0]] = _aa(block[:, None], out_sz[1:], st[1:])
        inter = planes[:, 0]
    else:
        if wait is not None:
            wait(None)
        inter = torch.from_numpy(_to_float32(view))
    plane_target = list(target)
    plane_target[order[0]] = spacing[order[0]]  # the slice axis keeps its spacing for now
    return PlanePass(
        planes=inter,
        order=order,  # type: ignore[arg-type]
        step=st[0],
        n_out=out_sz[0],
        affine=output_affine(affine, spacing, plane_target),
    )


def nearest_index(n_in: int, n_out: int, step: float) -> np.ndarray:
    """Input index of each output voxel for nearest-neighbour resampling on the same grid."""
    return np.clip(np.floor((np.arange(n_out) + 0.5) * step).astype(np.int64), 0, n_in - 1)


def _resample_label(data: np.ndarray, steps, shape_out) -> np.ndarray:
    """Nearest neighbour on the same grid: input index round((j + 0.5) * step - 0.5)."""
    idx = [
        nearest_index(n, m, step) for n, m, step in zip(data.shape, shape_out, steps, strict=True)
    ]
    out = data
    for axis in sorted(range(3), key=lambda a: -steps[a]):  # shrink first
        if steps[axis] != 1.0:
            out = np.take(out, idx[axis], axis=axis)
    return out


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    target: tuple[float, float, float],
    *,
    is_label: bool = False,
    wait: Callable[[int | None], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``data`` (with voxel->world ``affine``) to ``target`` spacing.

    Images (any numeric dtype): anti-aliased linear, float32 out. Labels
    (``is_label=True``): nearest neighbour, dtype kept. Returns the new array
    (C order not guaranteed) and its exact affine. Same spacing returns ``data``.
    ``wait(nbytes)``, when given, is called before the first ``nbytes`` of
    ``data``'s memory are read (``None``: all of it), so that resampling can
    start while the file is still decoding (`pipeline.reader.RawScan.wait`).
    """
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    steps = _steps(spacing, target)
    new_affine = output_affine(affine, spacing, target)
    if steps == (1.0, 1.0, 1.0):
        return data, new_affine
    shape_out = output_shape(data.shape, spacing, target)
    if is_label:
        if wait is not None:
            wait(None)
        return _resample_label(data, steps, shape_out), new_affine
    return resample_planes(data, affine, target, wait=wait).finish(), new_affine
