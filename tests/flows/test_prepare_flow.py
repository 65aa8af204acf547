"""The real `prepare_bank` flow (Prefect + Dask LocalCluster) on small phantoms and broken files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.pipeline.config import PrepareConfig
from tests.flows.scans import write_bad_inputs, write_dicom_series, write_phantom

CONFIG = PrepareConfig(spacing=(3.0, 3.0, 3.0)).to_dict()


def _statuses(report: dict) -> dict[str, str]:
    return {r["scan_id"]: r["status"] for r in report["scans"]}


@pytest.fixture
def three_scans(tmp_path: Path) -> Path:
    for i, modality in enumerate(("ct", "mr", "ct")):
        write_phantom(tmp_path / "in", f"case{i}", modality, seed=i)
    return tmp_path / "in"


def test_prepare_skip_and_redo(prefect_api: str, three_scans: Path, tmp_path: Path) -> None:
    import torch

    from maskbank.flows.prepare import prepare_bank

    bank_dir = tmp_path / "bank"
    threads = torch.get_num_threads()
    first = prepare_bank([str(three_scans)], str(bank_dir), CONFIG, workers=2, progress=False)
    assert _statuses(first) == {"case0": "ok", "case1": "ok", "case2": "ok"}
    assert torch.get_num_threads() == threads  # shared between the scans, then given back
    bank = Bank.open(bank_dir)
    assert bank.scan_ids == ["case0", "case1", "case2"]
    assert bank.scan("case0").has("label") and bank.scan("case1").modality == "mr"
    assert bank.verify() == []
    stored = json.loads(Path(first["report_path"]).read_text())
    assert stored["counts"] == {"ok": 3, "skipped": 0, "failed": 0}

    again = prepare_bank([str(three_scans)], str(bank_dir), CONFIG, workers=2, progress=False)
    assert set(_statuses(again).values()) == {"skipped"}

    # A changed source redoes only that scan.
    write_phantom(three_scans, "case2", "ct", seed=42)
    changed = prepare_bank([str(three_scans)], str(bank_dir), CONFIG, workers=2, progress=False)
    assert _statuses(changed) == {"case0": "skipped", "case1": "skipped", "case2": "ok"}
    assert [r.get("note") for r in changed["scans"] if r["status"] == "ok"] == ["source changed"]

    # A changed setting redoes every scan it affects, and the new grid lands in the bank.
    old_shape = Bank.open(bank_dir).scan("case0").shape
    coarser = PrepareConfig(spacing=(4.0, 4.0, 6.0)).to_dict()
    redo = prepare_bank([str(three_scans)], str(bank_dir), coarser, workers=2, progress=False)
    assert set(_statuses(redo).values()) == {"ok"}
    assert {r["note"] for r in redo["scans"]} == {"config changed"}
    bank = Bank.open(bank_dir)
    assert bank.scan("case0").spacing == (4.0, 4.0, 6.0)
    assert bank.scan("case0").shape[2] < old_shape[2]
    assert len(bank) == 3 and bank.verify() == []

    # Another folder whose file has the same stem must not replace case1 silently.
    write_phantom(tmp_path / "elsewhere", "case1", "ct", seed=7)
    clash = prepare_bank(
        [str(tmp_path / "elsewhere")], str(bank_dir), coarser, workers=2, progress=False
    )
    (rec,) = clash["scans"]
    assert rec["status"] == "failed" and "already holds a different scan" in rec["reason"]
    assert Bank.open(bank_dir).scan("case1").modality == "mr"


def test_dicom_and_nifti_of_one_phantom_agree(prefect_api: str, tmp_path: Path) -> None:
    from maskbank.flows.prepare import prepare_bank

    write_dicom_series(tmp_path / "in" / "dicom", seed=5)
    write_phantom(tmp_path / "in", "nifti", seed=5)
    report = prepare_bank([str(tmp_path / "in")], str(tmp_path / "bank"), CONFIG, progress=False)
    assert report["counts"]["ok"] == 2, report["scans"]
    bank = Bank.open(tmp_path / "bank")
    a, b = bank.scan("dicom"), bank.scan("nifti")
    assert a.shape == b.shape and a.modality == b.modality == "ct"
    assert np.abs(a.read("image").astype(np.float32) - b.read("image")).max() < 0.05


EXPECTED_REASONS = {
    "truncated": "truncated",
    "series4d": "4D",
    "with_nans": "NaN",
    "zero_spacing": "spacing",
    "empty": "empty",
    "notes": "not a readable",
    "absurd_size": "refusing to allocate",
    "missing": "not found",
}


def test_bad_inputs_fail_alone(prefect_api: str, tmp_path: Path) -> None:
    from maskbank.flows.prepare import prepare_bank

    bad = write_bad_inputs(tmp_path / "in")
    write_phantom(tmp_path / "in", "good1", seed=1)
    write_phantom(tmp_path / "in", "good2", "mr", seed=2)
    lines = ["image,label"] + [p.name + "," for p in bad.values()]
    lines += ["good1.nii.gz,good1_label.nii.gz", "good2.nii.gz,", "missing.nii.gz,"]
    # a good image whose label lies on another grid: the label file is named as the culprit
    write_phantom(tmp_path / "in", "good3", seed=3)
    lines += ["good3.nii.gz,bad_grid_label.nii.gz"]
    bad_label = tmp_path / "in" / "bad_grid_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint16), np.eye(4)), bad_label)
    manifest = tmp_path / "in" / "batch.csv"
    manifest.write_text("\n".join(lines) + "\n")

    report = prepare_bank([str(manifest)], str(tmp_path / "bank"), CONFIG, progress=False)
    by_id = {r["scan_id"]: r for r in report["scans"]}
    assert by_id["good1"]["status"] == "ok" and by_id["good2"]["status"] == "ok"
    for scan_id, words in EXPECTED_REASONS.items():
        rec = by_id[scan_id]
        assert rec["status"] == "failed", rec
        assert words.lower() in rec["reason"].lower(), rec
        assert rec["file"].endswith(Path(rec["image"]).name)
    assert by_id["good3"]["status"] == "failed" and by_id["good3"]["file"] == str(bad_label)
    assert "label shape" in by_id["good3"]["reason"]
    assert report["counts"] == {"ok": 2, "skipped": 0, "failed": len(EXPECTED_REASONS) + 1}
    bank = Bank.open(tmp_path / "bank")
    assert bank.scan_ids == ["good1", "good2"] and bank.verify() == []
    stored = json.loads(Path(report["report_path"]).read_text())
    assert {r["scan_id"] for r in stored["scans"] if r["status"] == "failed"} == {
        *EXPECTED_REASONS,
        "good3",
    }


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_io_errors_are_retried_then_reported(prefect_api: str, tmp_path: Path) -> None:
    """Reading /proc/self/mem raises a real EIO: retried within its batch, then one failed
    record. The scan is in the bank already and its file changed (now the symlink), so the
    run hashes it before anything else reads it."""
    from maskbank.flows.per_scan import RETRY_DELAYS_S, TASK_RETRIES
    from maskbank.flows.prepare import prepare_bank

    write_phantom(tmp_path / "in", "fine", seed=1)
    write_phantom(tmp_path / "in", "flaky", seed=2)
    (tmp_path / "in" / "m.csv").write_text("image\nflaky.nii.gz\nfine.nii.gz\n")
    args = ([str(tmp_path / "in" / "m.csv")], str(tmp_path / "bank"), CONFIG)
    assert prepare_bank(*args, progress=False)["counts"]["ok"] == 2
    (tmp_path / "in" / "flaky.nii.gz").unlink()
    (tmp_path / "in" / "flaky.nii.gz").symlink_to("/proc/self/mem")
    report = prepare_bank(*args, progress=False)
    by_id = {r["scan_id"]: r for r in report["scans"]}
    assert by_id["fine"]["status"] == "skipped"
    flaky = by_id["flaky"]
    assert flaky["status"] == "failed"
    assert "Input/output error" in flaky["reason"]
    assert f"after {TASK_RETRIES} retries" in flaky["reason"]
    assert report["seconds"] >= sum(RETRY_DELAYS_S[:TASK_RETRIES])  # the retries really waited


def test_prepare_with_proposals_in_the_same_tasks(
    prefect_api: str, three_scans: Path, tmp_path: Path
) -> None:
    """`--proposals`: each task also makes the scan's proposals; a re-run skips both."""
    from maskbank.bank.sampling import ProposalReader
    from maskbank.flows.prepare import prepare_bank
    from maskbank.pipeline.proposals.engine import ProposalConfig

    proposals = ProposalConfig(scales=(300,), max_proposals=400).to_dict()
    bank_dir = tmp_path / "bank"
    first = prepare_bank(
        [str(three_scans)], str(bank_dir), CONFIG, workers=2, progress=False, proposals=proposals
    )
    assert _statuses(first) == {"case0": "ok", "case1": "ok", "case2": "ok"}
    assert {r["proposals"] for r in first["scans"]} == {"ok"}
    bank = Bank.open(bank_dir)
    for scan_id in bank.scan_ids:
        reader = ProposalReader(bank.scan(scan_id))
        assert 20 <= reader.count <= 400
        assert bank.row(scan_id)["n_proposals"] == reader.count
    assert bank.verify() == []
    again = prepare_bank(
        [str(three_scans)], str(bank_dir), CONFIG, workers=2, progress=False, proposals=proposals
    )
    assert {(r["status"], r["proposals"]) for r in again["scans"]} == {("skipped", "skipped")}
