"""Optional post-processing of binary segmentations at inference.

Sliding-window inference over a whole scan can leave scattered false-positive islands far
from the structure (windows where it is absent but something looks alike). For a structure
known to be one connected piece, keeping only the largest connected component removes
them. It is an option beside calibrated predictions, not a substitute: a structure made of
several pieces (both lungs, both kidneys, multifocal lesions) loses all but one, so
evaluations should report scores with and without it.
"""

from __future__ import annotations

import numpy as np


def largest_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """The largest connected component of a binary ``mask`` (any dimension), as bool.

    ``connectivity`` 1 joins voxels sharing a face (6-neighbourhood in 3-D), ``mask.ndim``
    also those sharing an edge or a corner (26 in 3-D). An empty mask comes back empty; of
    components of equal size the one with the lowest label (first in C order) is kept.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not 1 <= connectivity <= max(mask.ndim, 1):
        raise ValueError(f"connectivity {connectivity} must lie in 1..{mask.ndim}")
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, n = ndimage.label(mask, structure=structure)
    if n == 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))
