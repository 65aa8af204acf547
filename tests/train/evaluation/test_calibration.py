"""Reference-calibrated thresholds: the step picked, the copy segmented, the cache."""

from __future__ import annotations

import numpy as np
import pytest

from maskbank.train.evaluation.calibration import (
    AUGMENTED,
    DICE,
    LADDER,
    PLAIN,
    VOLUME,
    AugmentedCopy,
    ReferenceCalibration,
    curve,
    describe,
    pick,
    threshold_option_problem,
)
from maskbank.train.evaluation.structures import StructureClass


def _over_predicting(shape=(20, 20, 20)) -> tuple[np.ndarray, np.ndarray]:
    """A 6^3 cube at 0.97, a 10^3 halo around it at 0.75 (over-prediction at 0.5), 0.1 else."""
    truth = np.zeros(shape, bool)
    truth[7:13, 7:13, 7:13] = True
    prob = np.full(shape, 0.1, np.float32)
    prob[5:15, 5:15, 5:15] = 0.75
    prob[truth] = 0.97
    return prob, truth


def test_volume_and_dice_pick_the_step_above_the_halo():
    prob, truth = _over_predicting()
    c = curve(prob, truth)
    assert c.shape == (len(LADDER), 2)
    assert c[0].tolist() == [1000, 216] and c[-1].tolist() == [216, 216]
    # 0.5..0.7 keep the halo (1000 voxels for 216 true), 0.8 is the first exact step
    assert pick([c], [216], VOLUME) == 0.8
    assert pick([c], [216], DICE) == 0.8


def test_ties_keep_the_lowest_step_and_never_go_under_it():
    truth = np.zeros((8, 8, 8), bool)
    truth[2:6, 2:6, 2:6] = True
    exact = truth.astype(np.float32)  # 1 inside, 0 outside: every step is perfect
    assert pick([curve(exact, truth)], [64], VOLUME) == LADDER[0] == 0.5
    assert pick([curve(exact, truth)], [64], DICE) == 0.5
    under = truth * np.float32(0.55)  # under-predicted everywhere above 0.5
    assert pick([curve(under, truth)], [64], VOLUME) == 0.5
    assert pick([], [], VOLUME) == 0.5  # nothing to calibrate on
    assert pick([curve(exact, np.zeros_like(truth))], [0], DICE) == 0.5


def test_several_references_are_pooled():
    prob, truth = _over_predicting()
    exact = truth.astype(np.float32)
    # one over-predicting reference, one exact one: the pooled volume still wants 0.8
    curves = [curve(prob, truth), curve(exact, truth)]
    assert pick(curves, [216, 216], VOLUME) == 0.8
    with pytest.raises(ValueError, match="criterion"):
        pick(curves, [216, 216], "area")


class _Scan:
    def __init__(self, scan_id: str, image: np.ndarray, label: np.ndarray) -> None:
        self.scan_id, self.dataset, self.spacing = scan_id, "d", (1.0, 1.0, 1.0)
        self.image, self.label = image, label

    def mask(self, value: int) -> np.ndarray:
        return self.label == value


def test_the_augmented_copy_keeps_grid_and_label_but_not_the_voxels():
    rng = np.random.default_rng(1)
    image = rng.standard_normal((12, 12, 12)).astype(np.float32)
    label = (rng.random((12, 12, 12)) > 0.7).astype(np.uint8)
    scan = _Scan("ref", image, label)
    a, b = AugmentedCopy(scan), AugmentedCopy(scan)
    assert a.image.shape == image.shape and a.image.dtype == np.float32
    assert np.array_equal(a.image, b.image)  # seeded
    assert not np.allclose(a.image, image, atol=1e-3)
    assert np.array_equal(a.mask(1), label == 1) and a.scan_id != scan.scan_id


class _Runner:
    """Probabilities from the scan it is given: over-predicts by a halo around the label."""

    label = "fake"
    crop = 8

    def __init__(self) -> None:
        self.seen: list[str] = []

    def segment(self, query, tasks):
        self.seen.append(query.scan_id)
        for i, (cls, _) in enumerate(tasks):
            truth = query.mask(cls.value)
            halo = np.zeros_like(truth)
            idx = np.nonzero(truth)
            box = tuple(slice(max(0, int(a.min()) - 2), int(a.max()) + 3) for a in idx)
            halo[box] = True
            prob = np.where(truth, 0.97, np.where(halo, 0.75, 0.1)).astype(np.float32)
            yield [i], prob[None]


def test_calibration_segments_each_reference_once_and_caches():
    prob, truth = _over_predicting()
    ref = _Scan("ref", prob, truth.astype(np.uint8))
    cls = StructureClass("d", 1, "cube", ("ref", "q"))
    runner = _Runner()
    calib = ReferenceCalibration(VOLUME, PLAIN)
    thresholds, seconds = calib.thresholds(runner, [(cls, [ref])])
    assert thresholds == [0.8] and seconds > 0 and runner.seen == ["ref"]
    again, seconds = calib.thresholds(runner, [(cls, [ref])])
    assert again == [0.8] and seconds == 0.0 and runner.seen == ["ref"]
    assert calib.chosen == [
        {"network": "fake", "class": "d/cube", "references": ["ref"], "threshold": 0.8}
    ]
    augmented = ReferenceCalibration(VOLUME, AUGMENTED)
    assert augmented.thresholds(_Runner(), [(cls, [ref])])[0] == [0.8]


def test_options_are_checked_and_described():
    assert threshold_option_problem("reference", "volume", "augmented") is None
    assert "--threshold must be" in threshold_option_problem("auto", "volume", "plain")
    assert "--threshold-by must be" in threshold_option_problem("fixed", "area", "plain")
    assert "--calibration-copy must be" in threshold_option_problem("fixed", "dice", "raw")
    assert describe("fixed", "volume", "augmented") == ">= 0.5"
    assert describe("reference", "dice", "plain").startswith("reference: dice on the plain")
    with pytest.raises(ValueError, match="--threshold-by"):
        ReferenceCalibration("area")
