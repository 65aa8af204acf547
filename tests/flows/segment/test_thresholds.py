"""`maskbank segment` thresholds: calibrated on the references, recorded, redone on change."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from maskbank.flows.segment import segment
from maskbank.flows.segment.run import SegmentOptions, SegmentRun
from maskbank.train.evaluation.calibration import LADDER, calibrate_images


def _one(tiny_run, phantoms, out: Path, **options):
    ref = tuple(str(p) for p in phantoms["ref0"])
    query = str(phantoms["q0"][0])
    kwargs = {"labels": "3,4", "out": out, "spacing": (2.0,) * 3, **options}
    return list(segment(str(tiny_run), [query], references=[ref], **kwargs))


def test_reference_thresholds_are_the_evaluations_and_applied(tmp_path, tiny_run, phantoms):
    out = tmp_path / "seg"
    ref = tuple(str(p) for p in phantoms["ref0"])
    opts = SegmentOptions(spacing=(2.0,) * 3, save_probabilities=True)
    run = SegmentRun(str(tiny_run), [str(phantoms["q0"][0])], references=[ref], labels="3,4",
                     out=out, options=opts)  # fmt: skip
    assert run.thresholds is not None and set(run.thresholds) <= set(LADDER)
    assert run.calibration_seconds > 0
    [result] = list(run.results())
    record = json.loads(Path(result.json_path).read_text())
    assert record["threshold"].startswith("reference: volume on the augmented")
    assert record["thresholds"] == {"3": run.thresholds[0], "4": run.thresholds[1]}
    labels = np.asarray(nib.load(result.seg_path).dataobj)
    p = nib.load(result.prob_path).get_fdata()  # uint8 steps of 1/255
    for channel, value in enumerate((3, 4)):  # a label only where its own threshold passes
        assert np.all(p[..., channel][labels == value] >= run.thresholds[channel] - 1 / 255)


def test_fixed_and_task_files_keep_half_and_a_change_redoes_the_query(tmp_path, tiny_run, phantoms):
    out = tmp_path / "seg"
    [fixed] = _one(tiny_run, phantoms, out, threshold="fixed", save_task=str(tmp_path / "t.st"))
    record = json.loads(Path(fixed.json_path).read_text())
    assert record["threshold"] == ">= 0.5" and record["thresholds"] == {"3": 0.5, "4": 0.5}
    assert [r.status for r in _one(tiny_run, phantoms, out, threshold="fixed")] == ["skipped"]
    # calibrated thresholds differ from the recorded ones unless all are 0.5: then skipped
    [again] = _one(tiny_run, phantoms, out)
    cuts = json.loads(Path(again.json_path).read_text())["thresholds"]
    assert again.status == ("skipped" if set(cuts.values()) == {0.5} else "ok")
    # a task file saved without calibration: its labels keep 0.5
    run = SegmentRun(str(tiny_run), [str(phantoms["q0"][0])], task=str(tmp_path / "t.st"),
                     out=tmp_path / "task", options=SegmentOptions())  # fmt: skip
    assert run.thresholds is None


def test_a_saved_task_keeps_its_calibrated_thresholds(tmp_path, tiny_run, phantoms):
    """A run from a task file cuts where the calibrated run that saved it did."""
    from maskbank.train.segment.tasks import load_tasks

    ref = tuple(str(p) for p in phantoms["ref0"])
    query, task = [str(phantoms["q0"][0])], str(tmp_path / "t.st")
    made = SegmentRun(str(tiny_run), query, references=[ref], labels="3,4", out=tmp_path / "a",
                      save_task=task, options=SegmentOptions(spacing=(2.0,) * 3))  # fmt: skip
    assert made.thresholds is not None
    assert load_tasks(task).thresholds == made.thresholds
    # this run's options are the defaults: volume on the augmented copy
    again = SegmentRun(str(tiny_run), query, task=task, out=tmp_path / "b",
                       options=SegmentOptions())  # fmt: skip
    assert again.thresholds == made.thresholds
    one = SegmentRun(str(tiny_run), query, task=task, labels="4", out=tmp_path / "c",
                     options=SegmentOptions())  # fmt: skip
    assert one.thresholds == made.thresholds[1:]  # a label subset keeps its own threshold
    fixed = SegmentRun(str(tiny_run), query, task=task, out=tmp_path / "d",
                       options=SegmentOptions(threshold="fixed"))  # fmt: skip
    assert fixed.thresholds is None


def test_calibrate_images_uses_the_references_holding_each_value():
    label = np.zeros((10, 10, 10), np.uint8)
    label[2:5, 2:5, 2:5] = 1  # 27 voxels of value 1; value 2 held by the other reference
    other = np.zeros_like(label)
    other[5:9, 5:9, 5:9] = 2

    def probabilities(image):
        # value 1: a halo at 0.85 around the cube; value 2: exact
        halo = np.zeros(image.shape, np.float32)
        halo[1:7, 1:7, 1:7] = 0.85
        halo[2:5, 2:5, 2:5] = 0.99
        yield [0, 1], np.stack([halo, (image > 0.5).astype(np.float32)])

    refs = [(label.astype(np.float32), label), (other.astype(np.float32) / 2, other)]
    assert calibrate_images(probabilities, refs, [1, 2], copy="plain") == [0.9, 0.5]
    assert calibrate_images(probabilities, refs, [1, 2], "dice", "plain") == [0.9, 0.5]


def test_a_task_file_run_records_the_rule_that_calibrated_its_thresholds(
    tmp_path, tiny_run, phantoms
):
    """The rule in a result's JSON is the one that picked the thresholds it cut with: a task
    file's, not this run's options, which did not calibrate anything."""
    from maskbank.train.evaluation.calibration import DICE, PLAIN, REFERENCE, describe
    from maskbank.train.segment.tasks import load_tasks

    ref = tuple(str(p) for p in phantoms["ref0"])
    query, task = [str(phantoms["q0"][0])], str(tmp_path / "t.st")
    options = SegmentOptions(spacing=(2.0,) * 3, threshold_by=DICE, calibration_copy=PLAIN)
    made = SegmentRun(str(tiny_run), query, references=[ref], labels="3,4", out=tmp_path / "a",
                      save_task=task, options=options)  # fmt: skip
    rule = describe(REFERENCE, DICE, PLAIN)
    assert load_tasks(task).threshold_rule == rule
    [first] = list(made.results())
    assert json.loads(Path(first.json_path).read_text())["threshold"] == rule
    # this run's options are the defaults: volume on the augmented copy
    again = SegmentRun(str(tiny_run), query, task=task, out=tmp_path / "b",
                       options=SegmentOptions())  # fmt: skip
    [second] = list(again.results())
    record = json.loads(Path(second.json_path).read_text())
    assert record["threshold"] == rule != describe(REFERENCE, "volume", "augmented")
    assert record["thresholds"] == {"3": made.thresholds[0], "4": made.thresholds[1]}
    fixed = SegmentRun(str(tiny_run), query, task=task, out=tmp_path / "c",
                       options=SegmentOptions(threshold="fixed"))  # fmt: skip
    [third] = list(fixed.results())
    assert json.loads(Path(third.json_path).read_text())["threshold"] == ">= 0.5"
