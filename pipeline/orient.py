"""Reorient a volume to RAS+ voxel order (index grows to Right, Anterior, Superior).

Only axis permutations and flips (no interpolation), so it is exact and cheap.
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations as ornt


def to_ras(
    data: np.ndarray, affine: np.ndarray, *, copy: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(data, affine)`` permuted/flipped so the voxel axes are closest to RAS.

    ``copy=False`` returns a strided view instead of a C-contiguous copy (for
    callers whose next step copies anyway).
    """
    transform = _ras_transform(affine)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    out = ornt.apply_orientation(data, transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, data.shape)
    return (np.ascontiguousarray(out) if copy else out), new_affine


def _ras_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from ``affine``'s voxel axes to RAS."""
    return ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("RAS"))


def ras_axes(affine: np.ndarray) -> list[tuple[int, bool]]:
    """For each voxel axis of ``affine``: the RAS axis `to_ras` moves it to, and whether it flips."""
    return [(int(axis), bool(sign < 0)) for axis, sign in _ras_transform(affine)]


def native_box(
    ras_box: tuple[slice, slice, slice], affine: np.ndarray, native_shape: tuple[int, ...]
) -> tuple[slice, slice, slice]:
    """The box of the native array whose `to_ras` view is ``ras_box`` (bounded slices)."""
    out = []
    for axis, (ras, flip) in enumerate(ras_axes(affine)):
        sl, n = ras_box[ras], native_shape[axis]
        out.append(slice(n - sl.stop, n - sl.start) if flip else slice(sl.start, sl.stop))
    return tuple(out)  # type: ignore[return-value]


def ras_affine(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The affine `to_ras` gives an array of ``shape`` with voxel->world ``affine``."""
    return affine @ ornt.inv_ornt_aff(_ras_transform(affine), shape)
