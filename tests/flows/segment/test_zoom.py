"""`maskbank segment` with a reference zoom: scales recorded, outputs on the query's grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maskbank.flows.cli import main
from maskbank.flows.segment import SegmentError, segment

SP = "2"


@pytest.fixture(scope="module")
def big_reference(tmp_path_factory, phantoms):
    """ref0's image with label 1 a box too large for the crop (scale 3), 2 a small one."""
    img_path, _ = phantoms["ref0"]
    img = nib.load(img_path)
    label = np.zeros(img.shape, np.uint8)
    label[4:44, 4:40, 3:33] = 1  # 40 x 36 x 30 voxels at 2 mm
    label[20:26, 20:26, 14:20] = 2
    root = tmp_path_factory.mktemp("bigref")
    mask = root / "big_seg.nii.gz"
    nib.save(nib.Nifti1Image(label, img.affine), mask)
    return str(img_path), str(mask)


def _run(tmp_path, tiny_run, ref, query, name, **options):
    out = tmp_path / name
    results = list(
        segment(
            str(tiny_run), [str(query)], references=[ref], out=out, spacing=(2.0,) * 3, **options
        )
    )
    assert [r.status for r in results] == ["ok"]
    return results[0]


def test_a_large_structure_is_zoomed_and_the_label_map_has_the_query_grid(
    tmp_path, tiny_run, phantoms, big_reference
):
    query = phantoms["q1"][0]  # another shape and spacing than the reference
    result = _run(tmp_path, tiny_run, big_reference, query, "fit", save_task=str(tmp_path / "t.st"))
    record = json.loads(Path(result.json_path).read_text())
    assert record["reference_zoom"] == "fit" and record["max_zoom"] == 4.0
    assert record["zoom_refine"] is True
    assert record["scales"]["1"] > 1 and record["scales"]["2"] == 1.0
    src, seg = nib.load(query), nib.load(result.seg_path)
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}

    coarse = _run(tmp_path, tiny_run, big_reference, query, "coarse", zoom_refine=False)
    assert json.loads(Path(coarse.json_path).read_text())["zoom_refine"] is False
    assert nib.load(coarse.seg_path).shape == src.shape

    # The saved task keeps its scales; another --max-zoom cannot be honoured without masks.
    with pytest.raises(SegmentError, match="max-zoom"):
        segment(
            str(tiny_run),
            [str(query)],
            task=str(tmp_path / "t.st"),
            out=tmp_path / "x",
            max_zoom=2.0,
        )
    again = list(
        segment(str(tiny_run), [str(query)], task=str(tmp_path / "t.st"), out=tmp_path / "fit")
    )
    assert [r.status for r in again] == ["skipped"]  # the same task, scales and refinement


def test_off_is_the_full_grid_and_a_zoomed_task_file_can_be_turned_off(
    tmp_path, tiny_run, phantoms, big_reference, capsys
):
    query = phantoms["q0"][0]
    # a task file holds no reference masks, so it thresholds at 0.5: compare with that
    off = _run(
        tmp_path, tiny_run, big_reference, query, "off", reference_zoom="off", threshold="fixed"
    )
    record = json.loads(Path(off.json_path).read_text())
    assert record["reference_zoom"] == "off" and record["scales"] == {"1": 1.0, "2": 1.0}
    task = tmp_path / "fit.st"
    argv = ["segment", "--checkpoint", str(tiny_run), "--reference", *big_reference]
    argv += ["--spacing", SP, "--out", str(tmp_path / "fit"), "--save-task", str(task)]
    assert main([*argv, str(query)]) == 0
    assert "at scale 3" in capsys.readouterr().err
    argv = ["segment", "--checkpoint", str(tiny_run), "--task", str(task)]
    argv += ["--reference-zoom", "off", "--out", str(tmp_path / "off-task")]
    assert main([*argv, str(query)]) == 0
    a = np.asarray(nib.load(off.seg_path).dataobj)
    b = np.asarray(nib.load(tmp_path / "off-task" / "q0_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(a, b)
    assert (
        main(
            [
                "segment",
                "--checkpoint",
                str(tiny_run),
                "--task",
                str(task),
                "--max-zoom",
                "0.5",
                str(query),
            ]
        )
        == 2
    )
