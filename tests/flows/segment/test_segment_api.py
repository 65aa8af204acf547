"""`flows.segment.segment` and `maskbank segment` on real files: outputs, failures, task files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maskbank.flows.cli import main
from maskbank.flows.segment import SegmentError, segment

from .conftest import SPACING, write_checkpoint

SP = "2"


def _names_file(tmp_path: Path) -> Path:
    from maskbank.pipeline.phantom import NAMES

    path = tmp_path / "names.json"
    path.write_text(json.dumps({str(v): n for v, n in NAMES.items()}))
    return path


def test_cohort_with_a_broken_file_writes_the_others_and_names_the_failure(
    tmp_path, tiny_run, phantoms, capsys
):
    queries = tmp_path / "cohort"
    shutil.copytree(phantoms["q0"][0].parent, queries)
    (queries / "broken.nii.gz").write_bytes(b"\x1f\x8b not really a gzip file")
    ref_img, ref_lab = phantoms["ref0"]
    out = queries / "seg"  # inside the queries' folder: its files must not become queries
    argv = ["segment", "--checkpoint", str(tiny_run), "--reference", str(ref_img), str(ref_lab)]
    argv += ["--labels", "3,4", "--spacing", SP, "--out", str(out), "--save-probabilities"]
    assert main([*argv, str(queries)]) == 1
    err = capsys.readouterr().err
    assert "broken" in err and "1 failed" in err and "2 of 3 queries" in err
    for name in ("q0", "q1"):
        src = nib.load(queries / f"{name}.nii.gz")
        seg = nib.load(out / f"{name}_seg.nii.gz")
        assert seg.shape == src.shape  # the query's own grid and affine
        np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 3, 4}
        prob = nib.load(out / f"{name}_prob.nii.gz")
        assert prob.shape == (*src.shape, 2) and prob.get_data_dtype() == np.uint8
        p = prob.get_fdata()  # uint8 steps of 1/255, scaled by the header
        labels = np.asarray(seg.dataobj)
        assert p.min() >= 0.0 and p.max() <= 1.0 + 1e-6
        for channel, value in enumerate((3, 4)):  # a label only where its probability passes
            assert np.all(p[..., channel][labels == value] >= 0.5)
        assert np.all(labels[p.max(axis=-1) < 0.5] == 0)
        record = json.loads((out / f"{name}_seg.json").read_text())
        assert record["labels"] == {"3": "label 3", "4": "label 4"}
        assert record["spacing"] == list(SPACING)
    assert not (out / "broken_seg.nii.gz").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    # re-running skips what is complete and still reports the broken file
    before = (out / "q0_seg.json").stat().st_mtime_ns
    assert main([*argv, "--json", str(queries)]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted(r["status"] for r in lines) == ["failed", "skipped", "skipped"]
    assert (out / "q0_seg.json").stat().st_mtime_ns == before


def test_saved_task_is_reused_and_refused_for_another_checkpoint(
    tmp_path, tiny_run, other_run, phantoms, capsys
):
    names = _names_file(tmp_path)
    refs = [phantoms["ref0"], phantoms["ref1"]]  # two shots of each structure, averaged
    query = str(phantoms["q0"][0])
    task = tmp_path / "liver_spleen.safetensors"
    first = list(
        segment(
            str(tiny_run),
            [query],
            references=[(str(i), str(m)) for i, m in refs],
            labels="liver,spleen",
            label_names=str(names),
            out=tmp_path / "a",
            save_task=str(task),
            spacing=SPACING,
            save_probabilities=True,
        )
    )
    assert [r.status for r in first] == ["ok"] and first[0].labels == {3: "liver", 4: "spleen"}
    first[0].show(path=str(tmp_path / "overlay.png"))  # the static figure, saved
    assert (tmp_path / "overlay.png").stat().st_size > 10_000
    assert task.is_file()
    again = list(
        segment(str(tiny_run), [query], task=str(task), out=tmp_path / "b", save_probabilities=True)
    )
    assert again[0].status == "ok"
    a = np.asarray(nib.load(tmp_path / "a" / "q0_prob.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "b" / "q0_prob.nii.gz").dataobj)
    np.testing.assert_array_equal(a, b)  # the task file carries the whole task (and spacing)
    assert json.loads((tmp_path / "b" / "q0_seg.json").read_text())["labels"]["3"] == "liver"
    # one label of the task only
    only = list(
        segment(str(tiny_run), [query], task=str(task), labels="spleen", out=tmp_path / "c")
    )
    assert only[0].labels == {4: "spleen"}
    with pytest.raises(SegmentError, match="task was made at"):
        segment(str(tiny_run), [query], task=str(task), out=tmp_path / "f", spacing=(1.5,) * 3)
    with pytest.raises(SegmentError, match="made by another network"):
        list(segment(str(other_run), [query], task=str(task), out=tmp_path / "d"))
    argv = ["segment", "--checkpoint", str(other_run), "--task", str(task), query]
    assert main([*argv, "--out", str(tmp_path / "e")]) == 2
    assert "made by another network" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, tiny_run, phantoms, capsys):
    ref_img, ref_lab = (str(p) for p in phantoms["ref0"])
    query = str(phantoms["q0"][0])
    base = ["segment", "--checkpoint", str(tiny_run), "--spacing", SP, "--out", str(tmp_path)]
    cases = [
        ([query], "--reference IMAGE MASK"),  # nothing to segment with
        (["--reference", ref_img, ref_lab, "--labels", "77", query], "in none of the reference"),
        (["--reference", ref_img, ref_lab, str(tmp_path / "missing.nii.gz")], "no such file"),
        (["--checkpoint", str(tmp_path), "--reference", ref_img, ref_lab, query], "no checkpoint"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, message
        assert message in capsys.readouterr().err


def test_query_over_the_memory_budget_fails_before_it_is_read(tmp_path, tiny_run, phantoms):
    ref_img, ref_lab = (str(p) for p in phantoms["ref0"])
    task = tmp_path / "t.safetensors"
    query = [str(phantoms["q0"][0])]
    run = segment(str(tiny_run), query, references=[(ref_img, ref_lab)], labels="3",
                  out=tmp_path / "a", save_task=str(task), spacing=SPACING)  # fmt: skip
    assert task.is_file() and run is not None
    results = list(
        segment(str(tiny_run), query, task=str(task), out=tmp_path / "o", max_scan_memory=200_000)
    )
    assert results[0].status == "failed" and "per-scan budget" in results[0].reason
    assert "GiB" in results[0].reason and not (tmp_path / "o" / "q0_seg.nii.gz").exists()
    with pytest.raises(ValueError, match="has no segmentation"):
        results[0].show()


def test_spacing_comes_from_the_pretraining_bank_when_the_checkpoint_names_it(tmp_path, phantoms):
    from maskbank.bank import Bank
    from maskbank.flows.segment import SegmentRun

    bank = Bank.create(tmp_path / "bank")
    img = np.zeros((8, 8, 8), np.float16)
    attrs = {"spacing": [2.5, 2.5, 3.0], "affine": np.eye(4).tolist(), "modality": "ct"}
    bank.write_scan("s0", {"image": img, "body": img > -1}, attrs)
    bank.rebuild_index()
    run_dir = write_checkpoint(tmp_path / "run", seed=0, bank=str(tmp_path / "bank"))
    ref_img, ref_lab = (str(p) for p in phantoms["ref0"])
    run = SegmentRun(
        str(run_dir), [str(phantoms["q0"][0])], references=[(ref_img, ref_lab)], labels="3",
        out=tmp_path / "o",
    )  # fmt: skip
    assert run.spacing == (2.5, 2.5, 3.0) and "pretraining bank" in run.spacing_source
    assert run.tasks.spacing == (2.5, 2.5, 3.0)


@pytest.mark.slow
def test_workers_on_a_local_dask_cluster_write_what_one_process_writes(
    tmp_path, tiny_run, phantoms
):
    """Worker processes get the checkpoint and a task file, and load them themselves."""
    ref = tuple(str(p) for p in phantoms["ref0"])
    queries = [str(phantoms["q0"][0]), str(phantoms["q1"][0])]
    common = {"references": [ref], "labels": "3,4", "spacing": SPACING}
    alone = list(segment(str(tiny_run), queries, out=tmp_path / "one", **common))
    spread = list(segment(str(tiny_run), queries, out=tmp_path / "dask", workers=2, **common))
    assert sorted(r.status for r in spread) == ["ok", "ok"]
    assert {r.scan_id for r in spread} == {r.scan_id for r in alone} == {"q0", "q1"}
    for r in alone:
        a = np.asarray(nib.load(r.seg_path).dataobj)
        b = np.asarray(nib.load(tmp_path / "dask" / f"{r.scan_id}_seg.nii.gz").dataobj)
        assert np.mean(a == b) > 0.999  # other processes, other thread counts: rounding only
    assert not [p for p in (tmp_path / "dask").iterdir() if p.name.startswith(".")]
