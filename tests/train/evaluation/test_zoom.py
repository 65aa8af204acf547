"""Scale-normalised in-context inference: the scale each class takes, and its round trip."""

from __future__ import annotations

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.train.evaluation import incontext
from maskbank.train.evaluation.checkpoint import load_network
from maskbank.train.evaluation.errors import EvaluationError
from maskbank.train.evaluation.incontext import InContextOptions
from maskbank.train.evaluation.structures import median_foreground
from maskbank.train.evaluation.zoom import (
    FIT,
    OFF,
    gate,
    reduce,
    reference_crop,
    reference_scale,
    restore,
    zoomed_shape,
)
from tests.train.evaluation.conftest import write_labelled_phantoms

CROP = 32
BIG, SMALL = 1, 2  # the edited phantoms' labels: a box larger than the crop, a small one


def _scale(mask: np.ndarray, mode: str = FIT, max_zoom: float = 4.0) -> float:
    return reference_scale(mask, CROP, mode, max_zoom)


def test_a_structure_larger_than_the_crop_is_zoomed_a_small_or_thin_one_is_not():
    vol = np.zeros((96, 96, 96), bool)
    big = vol.copy()
    big[20:70, 15:75, 25:65] = True  # 50 x 60 x 40: fills any 32^3 crop at its centre
    mid = vol.copy()
    mid[30:54, 30:50, 30:50] = True  # 24 x 20 x 20: fits, but spans most of the crop
    small = vol.copy()
    small[40:50, 40:52, 44:52] = True
    rod = vol.copy()
    rod[44:50, 44:50, 5:90] = True  # long but 6 voxels thin: zooming would erase it
    # 60 / (0.5 * 32) = 3.75 -> 4; its 40 voxels stay >= 8 at 4.
    assert _scale(big) == 4.0
    assert _scale(mid) == 1.5  # 24 / 16 = 1.5, allowed: 20 / 8 = 2.5 >= 1.5
    assert _scale(small) == 1.0 and _scale(rod) == 1.0
    assert _scale(big, OFF) == 1.0
    assert _scale(big, max_zoom=2.0) == 2.0  # the cap holds
    # At the chosen scale the crop shows background around the whole structure.
    s = _scale(big)
    _, crop_mask = reference_crop(big.astype(np.float32), big, median_foreground(big), CROP, s)
    assert crop_mask.shape == (CROP,) * 3 and 0.05 < crop_mask.mean() < 0.5
    for face in (crop_mask[0], crop_mask[-1], crop_mask[:, 0], crop_mask[:, :, -1]):
        assert face.max() == 0
    assert crop_mask.sum() * s**3 == pytest.approx(big.sum(), rel=0.02)


def test_reduce_and_restore_keep_a_structure_in_place():
    """Down by 2.5 and back: an off-centre blob keeps its centre of mass and its volume."""
    shape = (80, 70, 60)
    blob = np.zeros(shape, np.float32)
    blob[10:30, 40:62, 5:25] = 1.0
    small = reduce(blob, zoomed_shape(shape, 2.5))
    assert small.shape == (32, 28, 24)
    back = restore(small[None], shape)[0]
    assert back.shape == shape
    com = [np.average(np.indices(shape)[a], weights=blob) for a in range(3)]
    com_back = [np.average(np.indices(shape)[a], weights=back) for a in range(3)]
    assert np.allclose(com, com_back, atol=0.75)
    assert abs((back >= 0.5).sum() / blob.sum() - 1) < 0.15


def _boxes(seed: int, arrays: dict, attrs: dict) -> None:
    label = np.zeros_like(arrays["label"])
    label[4:44, 4:44, 3:37] = BIG  # 40 x 40 x 34 of the 48 x 48 x 40 scan
    label[20:26, 20:26, 16:22] = SMALL
    arrays["label"] = label
    attrs["label_names"] = {str(BIG): "big", str(SMALL): "small"}


def test_zoomed_classes_come_back_at_the_query_shape(tmp_path):
    bank = Bank.open(write_labelled_phantoms(tmp_path / "bank", n=3, edit=_boxes))
    net = load_network("random", "tiny", seed=1)

    def run(**zoom) -> tuple[dict, dict]:
        seen: dict[tuple[str, str], np.ndarray] = {}

        def keep(label, job, cls, prob):
            assert prob.shape == job.query.image.shape
            seen[(job.query.scan_id, cls.name)] = prob

        options = InContextOptions(bootstrap=20, max_figures=0, **zoom)
        return incontext.run(bank, [net], options, on_prediction=keep).data, seen

    res, refined = run()  # fit with the coarse-to-fine pass: the defaults
    assert res["reference_scales"][net.label] == {"phantom-ct/big": 3.0, "phantom-ct/small": 1.0}
    assert res["options"]["reference_zoom"] == FIT and res["options"]["max_zoom"] == 4.0
    assert res["options"]["zoom_refine"] is True
    assert len(refined) == 2 * 2  # two queries, both classes
    off, _ = run(reference_zoom=OFF)
    assert "reference_scales" not in off and "reference_zoom" not in off["options"]
    coarse_res, coarse = run(zoom_refine=False)
    # Off: 2 x 2 x 2 windows of 32 over 48 x 48 x 40. Zoomed: those for the small class,
    # and one window over the 16 x 16 x 13 grid at scale 3 for the big one.
    assert {q["windows"] for q in off["queries"]} == {8}
    assert {q["windows"] for q in coarse_res["queries"]} == {8 + 1}
    # Coarse to fine: the big class again at scale 2 (one window), kept inside its gate.
    windows = {q["query"]: q["windows"] for q in res["queries"]}
    live = 0
    for query in ("ct-01", "ct-02"):
        near = gate(coarse[(query, "big")], 3.0)
        assert not refined[(query, "big")][~near].any()
        assert windows[query] == 8 + 1 + int(near.any())
        live += int(near.any())
        assert np.array_equal(refined[(query, "small")], coarse[(query, "small")])
    assert live  # the refinement ran at least once


def test_bad_zoom_options_are_refused():
    with pytest.raises(EvaluationError, match="reference-zoom"):
        InContextOptions(reference_zoom="huge")
    with pytest.raises(EvaluationError, match="max-zoom"):
        InContextOptions(max_zoom=0.5)
