"""The demo's inputs: labelled datasets whose every class occurs in two or more scans, named."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maskbank.flows.demo_bank import write_inputs
from maskbank.pipeline.label_names import read_label_names
from maskbank.pipeline.phantom import NAMES


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def _classes_by_dataset(manifest: Path) -> dict[str, dict[int, int]]:
    """{dataset: {label value: number of scans holding it}} over the labelled rows."""
    out: dict[str, dict[int, int]] = {}
    for r in _rows(manifest):
        if not r["label"]:
            continue
        label = np.asarray(nib.load(manifest.parent / r["label"]).dataobj)
        names = read_label_names(manifest.parent / r["label_names"])
        counts = out.setdefault(r["dataset"], {})
        for v in np.unique(label).tolist():
            if v:
                assert v in names, f"{r['image']}: value {v} has no name"
                counts[v] = counts.get(v, 0) + 1
    return out


def test_synthetic_inputs_and_rerun_keeps_them(tmp_path: Path) -> None:
    manifest = write_inputs(tmp_path, synthetic=True)
    rows = _rows(manifest)
    assert [r["dataset"] for r in rows] == ["phantom-ct"] * 3 + ["phantom-mr", "phantom-pet"]
    assert read_label_names(manifest.parent / rows[0]["label_names"]) == NAMES
    classes = _classes_by_dataset(manifest)
    assert set(classes["phantom-ct"]) == set(NAMES) and min(classes["phantom-ct"].values()) >= 2

    stamps = {p: p.stat().st_mtime_ns for p in manifest.parent.glob("*.nii.gz")}
    assert write_inputs(tmp_path, synthetic=True) == manifest
    assert {p: p.stat().st_mtime_ns for p in manifest.parent.glob("*.nii.gz")} == stamps


@pytest.mark.realdata
def test_real_inputs_have_labelled_subjects(shared_data: Path, tmp_path: Path) -> None:
    manifest = write_inputs(tmp_path, synthetic=False)
    by_dataset: dict[str, int] = {}
    for r in _rows(manifest):
        by_dataset[r["dataset"]] = by_dataset.get(r["dataset"], 0) + 1
    assert by_dataset == {
        "chest-ct": 2,
        "sample-real": 2,
        "mr-template": 3,
        "phantom-ct": 3,
        "phantom-pet": 1,
    }
    classes = _classes_by_dataset(manifest)
    assert classes["mr-template"] == {1: 3, 2: 3} and classes["chest-ct"] == {1: 2}
    names = read_label_names(manifest.parent / "tissue_names.json")
    assert names == {1: "grey matter", 2: "white matter"}
