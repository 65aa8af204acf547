"""`maskbank segment` gives the in-context evaluation's probabilities, map for map.

Why this test exists: ``maskbank segment`` (``flows.segment``: NIfTI references prepared
and embedded by ``train.segment.references``, queries run by ``train.segment.inference``)
and ``maskbank evaluate incontext`` (``train.evaluation.segmenters.InContextEvaluator`` on
a bank's ``LabelledScan``s) embed references and segment queries in two code paths that
share only the sliding-window and zoom helpers. A segmentation is trusted because the
evaluation scored the same procedure: reference crops, shot averaging, the global task,
the task groups, the scale each class takes, the coarse-to-fine refinement and the
calibrated thresholds must stay the same in both. Here one network, one pair of
references and one query go through both paths: the evaluator reads from a bank the very
arrays segment prepared (the bank is written as ``maskbank prepare`` writes it, in
float32 as segment prepares), and every class's probability map, the scale each class
took, the task groups and the calibrated thresholds must agree.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.flows.segment.outputs import quantise
from maskbank.flows.segment.query import prepare_query
from maskbank.flows.segment.references import read_references
from maskbank.flows.segment.run import SegmentOptions, SegmentRun
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.prepare import prepare_scan
from maskbank.train.evaluation.calibration import ReferenceCalibration
from maskbank.train.evaluation.checkpoint import load_network
from maskbank.train.evaluation.incontext import InContextOptions
from maskbank.train.evaluation.segmenters import InContextEvaluator
from maskbank.train.evaluation.structures import StructureClass, labelled_scans

from .conftest import SPACING

K = 4  # classes per pass, fewer than the classes asked for: both paths must group alike
# Added to every logit of the untrained network, so that probabilities cross 0.5: the
# zoomed class's refinement gate is not empty and the calibrated thresholds not all 0.5.
SHIFT = 2.5
BIG = 10  # a structure too large for the 32^3 crop: seen at scale 3, refined at 2
LABELS = (1, 2, 3, 4, 5, BIG)
# Options that decide the maps: `maskbank segment` must default to the evaluation's.
SHARED_OPTIONS = (
    "overlap",
    "reference_zoom",
    "max_zoom",
    "zoom_refine",
    "threshold",
    "threshold_by",
    "calibration_copy",
)


@pytest.fixture(scope="module")
def network(tmp_path_factory, tiny_run) -> Path:
    """``tiny_run``'s untrained network, pretrained with K=4, its logits shifted by SHIFT."""
    from maskbank.train.checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint

    payload = load_checkpoint(resolve_checkpoint(tiny_run))
    payload["config"]["data"]["k"] = K
    payload["model"]["head.3.bias"][-1] += SHIFT  # the dynamic head's bias output
    out = tmp_path_factory.mktemp("match") / "run"
    save_checkpoint(out / "checkpoints", 0, payload)
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory, phantoms) -> list[tuple[str, str]]:
    """ref0 with BIG painted on the background of a 40x36x30 box, and ref1 as it is."""
    image, label = phantoms["ref0"]
    src = nib.load(label)
    mask = np.asarray(src.dataobj).copy()
    box = np.zeros(mask.shape, bool)
    box[4:44, 4:40, 3:33] = True
    mask[box & (mask == 0)] = BIG
    path = tmp_path_factory.mktemp("match") / "ref0_big_label.nii.gz"
    nib.save(nib.Nifti1Image(mask, src.affine), path)
    return [(str(image), str(path)), tuple(str(p) for p in phantoms["ref1"])]


def test_segment_gives_the_evaluations_probabilities(tmp_path, network, references, phantoms):
    for name in SHARED_OPTIONS:
        assert getattr(SegmentOptions(), name) == getattr(InContextOptions(), name), name

    # maskbank segment: references embedded and calibrated once, the query on the grid
    query, query_label = (str(p) for p in phantoms["q1"])  # another shape and spacing
    run = SegmentRun(
        str(network),
        [query],
        references=references,
        labels=",".join(map(str, LABELS)),
        out=tmp_path / "seg",
        options=SegmentOptions(spacing=SPACING, save_probabilities=True),
    )
    assert run.tasks.values == list(LABELS)
    assert run.tasks.class_scales == [1.0] * 5 + [3.0]  # the zoom and its refinement run
    prepared = prepare_query(query, run.spacing)
    ours, our_groups = {}, []
    for ids, probs in run.segmenter.probabilities(prepared.image):
        our_groups.append(ids)
        ours.update(zip(ids, probs, strict=True))
    assert len(our_groups) > 2  # the scale-1 classes in two groups of at most K
    assert max(run.thresholds) > 0.5  # calibration is not trivial
    # ... and these are the maps `segment` writes (uint8, on the query's own grid)
    [result] = list(run.results())
    saved = nib.load(result.prob_path).dataobj.get_unscaled()  # the uint8 steps
    for i in range(len(LABELS)):
        np.testing.assert_array_equal(saved[..., i], prepared.grid.to_original(quantise(ours[i])))

    # the evaluation: the same files prepared into a bank as `maskbank prepare` writes it
    bank = Bank.create(tmp_path / "bank")
    config = PrepareConfig(spacing=run.spacing, image_dtype="float32")
    scan_ids = ["ref0", "ref1", "query"]
    for scan_id, (image, label) in zip(scan_ids, [*references, (query, query_label)], strict=True):
        scan = prepare_scan(image, label, config=config, dataset="phantom")
        bank.write_scan(scan_id, scan.arrays(), scan.attrs)
    scans = {s.scan_id: s for s in labelled_scans(Bank.open(tmp_path / "bank"))}
    refs, _ = read_references(references, run.spacing)  # segment's own preparation
    for ref, scan_id in zip(refs, scan_ids[:2], strict=True):
        np.testing.assert_array_equal(ref.image, scans[scan_id].image)
        np.testing.assert_array_equal(ref.label, scans[scan_id].label)
    np.testing.assert_array_equal(prepared.image, scans["query"].image)

    # each class with the references holding it, in segment's order
    tasks = []
    for value in LABELS:
        holders = [scans[s] for s in scan_ids[:2] if scans[s].counts.get(value)]
        ids = tuple(s.scan_id for s in holders)
        tasks.append((StructureClass("phantom", value, str(value), ids), holders))
    assert [len(h) for _, h in tasks] == [2] * 5 + [1]

    options = InContextOptions()
    net = load_network(str(network))
    assert net.task_group == run.network.max_group == K
    evaluator = InContextEvaluator(net, options)
    calibration = ReferenceCalibration(options.threshold_by, options.calibration_copy)
    thresholds, _ = calibration.thresholds(evaluator, tasks)  # before the query, as scored
    assert thresholds == run.thresholds

    theirs, their_groups = {}, []
    for ids, probs in evaluator.segment(scans["query"], tasks):
        their_groups.append(ids)
        theirs.update(zip(ids, probs, strict=True))
    assert their_groups == our_groups
    assert [evaluator.scales[c.key] for c, _ in tasks] == run.tasks.class_scales
    for i, value in enumerate(LABELS):
        assert theirs[i].shape == prepared.image.shape
        np.testing.assert_allclose(ours[i], theirs[i], rtol=0, atol=1e-5, err_msg=f"label {value}")
