"""Segmentation metrics against hand-computed cases and the uncropped MONAI calls."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_hausdorff_distance,
    compute_surface_dice,
)
from scipy import ndimage

from maskbank.train.evaluation.metrics import (
    MISS_PENALTY_MM,
    SegScores,
    binarise,
    dice,
    is_miss,
    mean_scores,
    score,
)


def _cube(shape: tuple[int, int, int], start: tuple[int, int, int], size: tuple[int, int, int]):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))] = True
    return mask


def _monai_uncropped(pred: np.ndarray, gt: np.ndarray, spacing, tol: float) -> tuple[float, float]:
    """The reference: MONAI on the whole volume, no cropping of ours."""
    y_pred, y = torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=list(spacing)
        )
        nsd = compute_surface_dice(
            y_pred, y, class_thresholds=[tol], include_background=True, spacing=list(spacing)
        )
    return float(hd.item()), float(nsd.item())


def _blob(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """An irregular mask: thresholded smoothed noise."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    return ndimage.gaussian_filter(noise, 2.0) > 0.08


SHAPE = (16, 16, 16)
A = _cube(SHAPE, (4, 4, 4), (4, 4, 4))
B_Z = _cube(SHAPE, (4, 4, 5), (4, 4, 4))  # A shifted one voxel along z (axis 2)
B_X = _cube(SHAPE, (5, 4, 4), (4, 4, 4))  # A shifted one voxel along x (axis 0)


def test_cubes_shifted_within_tolerance():
    # 48 of 64 voxels overlap; the top face of B lies one z-voxel (1.5 mm) above A's.
    scores = score(B_Z, A, spacing=(1.0, 1.0, 1.5), tolerance_mm=2.0)
    assert scores.dice == pytest.approx(2 * 48 / 128)
    assert scores.hd95 == pytest.approx(1.5)
    # Of each cube's 56 surface voxels, the 16 of its outer z face lie 1.5 mm off the other
    # surface, the 4 face-centre voxels inside the other cube 1 mm (its side), the rest on it.
    assert scores.asd == pytest.approx(2 * (16 * 1.5 + 4 * 1.0) / 112)
    assert scores.nsd == pytest.approx(1.0)


def test_cubes_shifted_beyond_tolerance():
    # Each 4^3 cube has 56 surface voxels; B's top face and A's bottom face (16 each) are
    # 3 mm from the other surface, everything else within 1 mm: NSD = (40 + 40) / 112.
    scores = score(B_Z, A, spacing=(1.0, 1.0, 3.0), tolerance_mm=2.0)
    assert scores.hd95 == pytest.approx(3.0)
    assert scores.nsd == pytest.approx(80 / 112)


def test_slabs_shifted_beyond_tolerance():
    # Two-voxel-thick plates are all surface; half of each plate is the shared layer.
    gt = _cube(SHAPE, (3, 3, 6), (8, 8, 2))
    pred = _cube(SHAPE, (3, 3, 7), (8, 8, 2))
    scores = score(pred, gt, spacing=(1.0, 1.0, 3.0), tolerance_mm=2.0)
    assert scores.dice == pytest.approx(0.5)
    assert scores.hd95 == pytest.approx(3.0)
    assert scores.nsd == pytest.approx(0.5)
    # The same plates pass a tolerance above the shift.
    assert score(pred, gt, spacing=(1.0, 1.0, 3.0), tolerance_mm=3.0).nsd == pytest.approx(1.0)


def test_anisotropic_spacing_distinguishes_axes():
    spacing = (0.8, 0.8, 3.0)
    along_x = score(B_X, A, spacing=spacing)
    along_z = score(B_Z, A, spacing=spacing)
    assert along_x.dice == along_z.dice
    assert along_x.hd95 == pytest.approx(0.8)
    assert along_z.hd95 == pytest.approx(3.0)
    assert along_x.nsd == pytest.approx(1.0)
    assert along_z.nsd < 1.0


def test_identical_masks():
    mask = _blob((24, 20, 18), seed=3)
    assert score(mask, mask.copy(), spacing=(0.7, 0.7, 2.5)) == SegScores(1.0, 0.0, 1.0, 0.0)


def test_both_empty():
    empty = np.zeros((10, 20, 30), dtype=bool)
    assert score(empty, empty, spacing=(1.0, 2.0, 0.5)) == SegScores(1.0, 0.0, 1.0, 0.0)


@pytest.mark.parametrize("missing", ["pred", "gt"])
def test_a_miss_takes_the_fixed_penalty_whatever_the_image_size(missing: str):
    for shape in ((10, 20, 30), (200, 200, 200)):
        present = _cube(shape, (2, 2, 2), (3, 3, 3))
        empty = np.zeros(shape, dtype=bool)
        pred, gt = (empty, present) if missing == "pred" else (present, empty)
        scores = score(pred, gt, spacing=(1.0, 2.0, 0.5))
        assert is_miss(pred, gt) and not is_miss(present, present)
        assert scores == SegScores(0.0, MISS_PENALTY_MM, 0.0, MISS_PENALTY_MM)
    assert MISS_PENALTY_MM == 500.0


def test_distances_are_clipped_at_the_penalty():
    # Two voxels 600 mm apart: a far false hit never scores worse than a miss.
    shape = (4, 4, 4)
    pred, gt = _cube(shape, (0, 0, 0), (1, 1, 1)), _cube(shape, (3, 0, 0), (1, 1, 1))
    scores = score(pred, gt, spacing=(200.0, 1.0, 1.0))
    assert scores.hd95 == MISS_PENALTY_MM and scores.asd == MISS_PENALTY_MM


def test_threshold_is_inclusive():
    prob = np.array([0.49, 0.5, 0.51])
    assert binarise(prob).tolist() == [False, True, True]


@pytest.mark.parametrize("case", ["touching_border", "irregular_interior"])
def test_cropping_matches_uncropped_monai(case: str):
    shape, spacing, tol = (40, 36, 24), (0.7, 0.9, 2.5), 2.0
    if case == "touching_border":
        # Cut by the x = 0 and z = max faces: the border is part of both surfaces.
        gt = _cube(shape, (0, 10, 15), (8, 12, 9))
        pred = _cube(shape, (0, 12, 14), (10, 12, 10))
    else:
        gt = _blob(shape, seed=0)
        pred = ndimage.binary_dilation(gt, iterations=2) & ~_blob(shape, seed=1)
    assert pred.any() and gt.any() and (pred != gt).any()
    scores = score(pred, gt, spacing=spacing, tolerance_mm=tol)
    hd95, nsd = _monai_uncropped(pred, gt, spacing, tol)
    asd = compute_average_surface_distance(
        torch.from_numpy(pred)[None, None],
        torch.from_numpy(gt)[None, None],
        include_background=True,
        symmetric=True,
        spacing=list(spacing),
    )
    assert scores.asd == pytest.approx(float(asd.item()), rel=1e-6)
    assert scores.hd95 == pytest.approx(hd95, rel=1e-6)
    assert scores.nsd == pytest.approx(nsd, rel=1e-6)
    assert 0.0 < scores.nsd < 1.0


def test_integer_masks_equal_boolean():
    scores = score(B_Z.astype(np.uint8), A.astype(np.int64), spacing=(1.0, 1.0, 1.5))
    assert scores == score(B_Z, A, spacing=(1.0, 1.0, 1.5))


def test_dice_counts_overlap():
    gt = _cube(SHAPE, (0, 0, 0), (2, 2, 2))  # 8 voxels
    pred = _cube(SHAPE, (1, 0, 0), (3, 2, 2))  # 12 voxels, 4 shared
    assert dice(pred, gt) == pytest.approx(8 / 20)
    assert dice(np.zeros(SHAPE), np.zeros(SHAPE)) == 1.0
    assert dice(pred, np.zeros(SHAPE)) == 0.0


@pytest.mark.parametrize(
    ("pred_shape", "gt_shape"), [((8, 8, 8), (8, 8, 9)), ((8, 8), (8, 8)), ((2, 8, 8, 8),) * 2]
)
def test_bad_shapes_raise_with_the_shapes(pred_shape, gt_shape):
    with pytest.raises(ValueError, match=str(pred_shape).replace("(", r"\(").replace(")", r"\)")):
        score(np.zeros(pred_shape, bool), np.zeros(gt_shape, bool), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros(pred_shape, bool), np.zeros(gt_shape, bool))


def test_score_raises_no_monai_warnings_and_leaves_filters_alone():
    before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score(B_Z, A, spacing=(1.0, 1.0, 1.5))
    assert warnings.filters == before


def test_mean_scores():
    scores = [SegScores(1.0, 0.0, 1.0, 0.0), SegScores(0.5, 3.0, 0.25, 1.0)]
    assert mean_scores(scores) == {"dice": 0.75, "hd95": 1.5, "nsd": 0.625, "asd": 0.5}
    assert scores[1].to_dict() == {"dice": 0.5, "hd95": 3.0, "nsd": 0.25, "asd": 1.0}
    with pytest.raises(ValueError, match="at least one"):
        mean_scores([])


def test_small_structure_in_large_volume():
    """The bounding-box crop keeps a 256^3 volume cheap; the values stay exact."""
    shape = (256, 256, 256)
    gt = _cube(shape, (100, 120, 90), (20, 20, 20))
    pred = _cube(shape, (102, 119, 91), (20, 20, 20))
    scores = score(pred, gt, spacing=(0.8, 0.8, 2.0))
    assert scores.dice == pytest.approx(2 * 18 * 19 * 19 / 16000)
    assert scores.hd95 == pytest.approx(2.0)
