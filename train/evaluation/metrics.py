"""Per-structure segmentation metrics at the bank's voxel spacing: Dice, HD95, ASD and NSD.

Masks are 3D arrays in the bank's ``[x, y, z]`` order (nonzero = foreground) and
``spacing[i]`` is the voxel size in mm along array axis ``i``, so anisotropic voxels
give distances in mm, not in voxels. The distance metrics are MONAI's
(``compute_hausdorff_distance``, ``compute_average_surface_distance``,
``compute_surface_dice``, reduced here from one shared surface-distance call) so the
numbers match what
the literature reports; surfaces are the voxels of a mask that touch its background
(6-neighbourhood erosion), and voxels outside the array count as background, so a
structure cut by the volume border has a surface along that border.

* **Dice**: ``2 |P ∩ G| / (|P| + |G|)``.
* **HD95** (mm): MONAI's symmetric 95th-percentile Hausdorff distance, i.e. the larger
  of the two directed 95th percentiles of surface-to-surface distances.
* **ASD** (mm): MONAI's average symmetric surface distance, the mean of the distances
  of every surface voxel of either mask to the other mask's surface.
* **NSD** at ``tolerance_mm``: the fraction of surface voxels of both masks lying
  within the tolerance of the other mask's surface (no sub-voxel areas).

Empty masks, where MONAI gives nan/inf, are defined here so that means stay finite:

* gt and pred both empty: Dice 1, HD95 0, ASD 0, NSD 1 (nothing to find, nothing
  found). The in-context evaluation keeps such rows (a class absent from the query
  and not predicted) out of its means and scores absent classes by their false
  positives instead;
* exactly one empty (a missed structure, or a structure predicted where there is
  none): Dice 0, NSD 0 and HD95 = ASD = ``MISS_PENALTY_MM`` (500 mm), the fixed
  penalty of the published evaluation code. A fixed number, unlike the volume's
  diagonal, does not grow with the image size, so a miss weighs the same in every
  dataset. Every finite distance is clipped at the same 500 mm, so a miss never scores
  better than a hit. ``is_miss`` tells callers to count misses beside the means.

Predictions are probabilities thresholded at ``>= THRESHOLD`` (0.5) unless a caller
gives its own threshold (the in-context evaluation's reference-calibrated ones,
``calibration.py``).

Speed: the distance computations run on the bounding box of ``pred | gt`` padded by
``ceil(tolerance / spacing) + 2`` voxels per axis (clipped to the volume). Everything
outside that box is background and every surface voxel lies inside it, so the surfaces
and their distances are those of the whole volume: the result equals the uncropped MONAI
call (tested, including structures cut by the volume border, where the crop stops at
the border and MONAI's implicit background begins as before). The padding keeps the
crop edge away from the surfaces so this holds without relying on MONAI's own internal
one-voxel pad. On a 256^3 volume with a 20^3 structure, ``score`` is about 60x faster
than the same MONAI calls on the uncropped volume (about 20 ms against 1.3 s when measured).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance

MISS_PENALTY_MM = 500.0  # HD95 / ASD of a miss, and the clip of every distance
THRESHOLD = 0.5  # probability >= THRESHOLD is foreground


@dataclass(frozen=True)
class SegScores:
    """The four metrics of one binary structure in one scan."""

    dice: float
    hd95: float  # mm
    nsd: float  # at the tolerance passed to ``score``
    asd: float  # mm

    def to_dict(self) -> dict[str, float]:
        """Plain floats, for JSON reports and tables."""
        return {k: float(v) for k, v in asdict(self).items()}


def _as_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean views of two same-shape 3D masks; a mismatch is a caller bug, so it raises."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim != 3 or gt.ndim != 3 or pred.shape != gt.shape:
        raise ValueError(
            f"pred and gt must be 3D masks of the same shape, got {pred.shape} and {gt.shape}"
        )
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice overlap; 1 when both masks are empty (a correctly predicted absence)."""
    pred, gt = _as_masks(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _bounding_box(mask: np.ndarray, margin: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices of the box around ``mask``'s nonzero voxels, padded and clipped to the array."""
    box = []
    for axis, size in enumerate(mask.shape):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(
            slice(max(int(hits[0]) - margin[axis], 0), min(int(hits[-1]) + 1 + margin[axis], size))
        )
    return tuple(box)


def is_miss(pred: np.ndarray, gt: np.ndarray) -> bool:
    """Exactly one of the two masks is empty (scored with ``MISS_PENALTY_MM``)."""
    return bool(np.any(pred)) != bool(np.any(gt))


def binarise(prob: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Foreground where the probability is ``>= threshold``."""
    return np.asarray(prob) >= threshold


def _distance_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float
) -> tuple[float, float, float]:
    """HD95, NSD and ASD on non-empty masks from one MONAI surface-distance computation.

    ``compute_hausdorff_distance``, ``compute_surface_dice`` and
    ``compute_average_surface_distance`` each call ``get_edge_surface_distance`` (Euclidean,
    symmetric, whole-voxel edges) and reduce its two directed distance vectors; this does
    the same reductions on one call, so the edges and distance transforms are computed once
    instead of three times (agreement with the three MONAI calls is tested).
    """
    y_pred = torch.from_numpy(np.ascontiguousarray(pred)).float()
    y = torch.from_numpy(np.ascontiguousarray(gt)).float()
    with warnings.catch_warnings():
        # MONAI 1.5+ passes its own deprecated ``always_return_as_numpy`` internally.
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", message=".*deprecated", category=category)
        _, (pred_to_gt, gt_to_pred), _ = get_edge_surface_distance(
            y_pred,
            y,
            distance_metric="euclidean",
            spacing=list(spacing),
            use_subvoxels=False,
            symmetric=True,
            class_index=0,
        )
    hd95 = max(float(torch.quantile(d.double(), 0.95)) for d in (pred_to_gt, gt_to_pred))
    hits = int((pred_to_gt <= tolerance_mm).sum()) + int((gt_to_pred <= tolerance_mm).sum())
    both = torch.cat([pred_to_gt, gt_to_pred])
    return hd95, hits / both.numel(), float(both.mean())


def score(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, float, float],
    tolerance_mm: float = 2.0,
) -> SegScores:
    """Dice, HD95 (mm), NSD at ``tolerance_mm`` and ASD (mm); empty cases as documented."""
    pred, gt = _as_masks(pred, gt)
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive voxel sizes in mm, got {spacing}")
    if not tolerance_mm >= 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return SegScores(dice=1.0, hd95=0.0, nsd=1.0, asd=0.0)
    if has_pred != has_gt:
        return SegScores(dice=0.0, hd95=MISS_PENALTY_MM, nsd=0.0, asd=MISS_PENALTY_MM)
    margin = tuple(math.ceil(tolerance_mm / s) + 2 for s in spacing)
    box = _bounding_box(pred | gt, margin)
    pred, gt = pred[box], gt[box]
    hd95, nsd, asd = _distance_metrics(pred, gt, tuple(float(s) for s in spacing), tolerance_mm)
    return SegScores(
        dice=dice(pred, gt),
        hd95=min(hd95, MISS_PENALTY_MM),
        nsd=nsd,
        asd=min(asd, MISS_PENALTY_MM),
    )


def mean_scores(scores: list[SegScores]) -> dict[str, float]:
    """Mean of each metric over structures or scans; every score is finite by construction."""
    if not scores:
        raise ValueError("mean_scores needs at least one SegScores")
    rows = [s.to_dict() for s in scores]
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
