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
    current = ornt.io_orientation(affine)
    transform = ornt.ornt_transform(current, ornt.axcodes2ornt("RAS"))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    out = ornt.apply_orientation(data, transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, data.shape)
    return (np.ascontiguousarray(out) if copy else out), new_affine
