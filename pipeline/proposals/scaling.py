"""Engine parameters that follow the body's size and the grid, not fixed human millimetres.

A child, a macaque or a cropped field of view holds far fewer voxels than an
adult torso; fixed supervoxel counts and a fixed minimum volume in mm^3 give
such a body a handful of coarse proposals.  Here every size is a number of
voxels of the scan's grid or a fraction of the body's volume, clamped so that
a small body still gets a rich set and a large one stays within time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TreeSpec:
    """One merge hierarchy: its supervoxel count and how it merges."""

    n_leaves: int
    compactness: float
    spatial_weight: float


@dataclass(frozen=True)
class ScalePlan:
    """Per-scan sizes (voxels of the scan's grid) derived from the config and the body."""

    min_voxels: int
    trees: tuple[TreeSpec, ...]
    #: (segments, compactness, seed offset in cells, flood factor) per plain partition,
    #: copies expanded
    partitions: tuple[tuple[int, float, tuple[float, float, float], int], ...]
    split_min_voxels: int | None
    split_distance_mm: float
    flood_factor: int


def body_length_mm(body_voxels: int, spacing) -> float:
    """Edge of the cube with the body's volume (its characteristic size)."""
    return (body_voxels * math.prod(float(s) for s in spacing)) ** (1 / 3)


def n_leaves(body_voxels: int, leaf_voxels: float, lo: int, hi: int) -> int:
    """Supervoxels for a mean size of ``leaf_voxels``, clamped to [lo, hi] and to >= 8 voxels each."""
    n = int(round(body_voxels / max(leaf_voxels, 1.0)))
    return max(2, min(max(lo, min(n, hi)), body_voxels // 8))


#: Offsets of the k-th shifted seed grid: the R3 low-discrepancy sequence (the
#: generalised golden ratio in 3-D), so any number of copies spreads evenly.
_R3 = 1.2207440846057596


def seed_offsets(copies: int) -> list[tuple[float, float, float]]:
    """Seed positions within a grid cell (fractions per axis) for ``copies`` shifted grids."""
    alpha = [1 / _R3 ** (d + 1) for d in range(3)]
    return [tuple((0.5 + k * a) % 1.0 for a in alpha) for k in range(max(1, int(copies)))]


def scale_plan(config, body_voxels: int, spacing, modality: str) -> ScalePlan:
    """The sizes the engine uses for this body (see ProposalConfig for the knobs)."""
    if config.min_volume_mm3:
        vox_mm3 = math.prod(float(s) for s in spacing)
        min_voxels = max(1, math.ceil(config.min_volume(modality) / vox_mm3))
    else:
        min_voxels = max(config.min_voxels, math.ceil(config.min_body_fraction * body_voxels))
    if config.scales:  # explicit supervoxel counts: plain hierarchies (no spatial term)
        trees = tuple(TreeSpec(int(n), config.compactness, 0.0) for n in config.scales)
    else:
        lo, hi = config.leaf_count_range
        trees = tuple(
            TreeSpec(n_leaves(body_voxels, leaf, lo, hi), comp, ws)
            for leaf, comp, ws in config.trees
        )
    factor = config.supervoxel_factor or (2 if body_voxels >= 2_000_000 else 1)
    partitions = []
    for segments, comp, copies in config.partitions:
        n = max(2, min(int(segments), body_voxels // 8))
        # segments of >= coarse_flood_voxels lose little on a 2x grid, and their ragged
        # full-resolution boundaries cost more bytes than the fine partitions' ones
        f = max(factor, 2) if body_voxels / n >= config.coarse_flood_voxels else factor
        partitions += [(n, comp, off, f) for off in seed_offsets(copies)]
    split = None
    if config.split_body_fraction > 0:
        split = max(min_voxels, int(config.split_body_fraction * body_voxels))
    return ScalePlan(
        min_voxels=min_voxels,
        trees=trees,
        partitions=tuple(partitions),
        split_min_voxels=split,
        split_distance_mm=config.split_distance_fraction * body_length_mm(body_voxels, spacing),
        flood_factor=factor,
    )
