"""Which query voxels the reference crop shows: the part of a pair matching can recover.

Both crops of a pair are cut from one scan (the sampler knows where: ``ref_start`` and
``query_start``, the corners of the padded boxes) and warped by known affines
(``PairAugmenter(geometry=True)``: output offsets from the crop centre to input offsets).
A query voxel's scan position is therefore known, and so is whether the reference crop
covers it. Where it does not, the reference never showed the structure there: a network
can only guess it (the structure's appearance continuing), so held-out pair validation
reports Dice inside this view beside the plain Dice, and what an exact copy of the
reference's masks would score (``train.validation``).
"""

from __future__ import annotations

import torch

from maskbank.train.augment.spatial import voxel_coords


def reference_view(
    ref_start: torch.Tensor,
    query_start: torch.Tensor,
    padded: int,
    ref_affine: torch.Tensor,
    query_affine: torch.Tensor,
    crop: int,
) -> torch.Tensor:
    """(n, crop, crop, crop) bool: query voxels whose scan position lies in the reference crop.

    ``ref_start``/``query_start`` (n, 3): scan voxel of each padded box's corner;
    ``padded``: the boxes' edge (``crop + 2 * margin``); affines (n, 3, 3) as the augmenter
    drew them (identity where none was).
    """
    starts = query_start.to(torch.float32)[:, :, None, None, None]
    scan = voxel_coords(query_affine, (padded,) * 3, crop) + starts  # (n, 3, c, c, c)
    centre = ref_start.to(torch.float32) + (padded - 1) / 2
    rel = scan - centre[:, :, None, None, None]
    inverse = torch.linalg.inv(ref_affine.double()).float()
    offset = torch.einsum("nab,nbxyz->naxyz", inverse, rel)
    return (offset.abs() <= crop / 2).all(1)
