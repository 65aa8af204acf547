"""`maskbank propose --name` and `--import`: named proposal sets made by the CLI, listed by info."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.sampling import ProposalReader
from tests.flows.cli_run import maskbank
from tests.flows.scans import phantom_bank


@pytest.fixture(scope="module")
def bank_and_masks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Scans a, b, c; masks/a/ holds one binary NIfTI per organ of a's label, masks/b.nii.gz
    is on the wrong grid, c has no masks."""
    root = tmp_path_factory.mktemp("sets")
    phantom_bank(root, "in", "sets")
    label = nib.load(root / "in" / "a_label.nii.gz")
    values = np.asarray(label.dataobj)
    organs = root / "masks" / "a"
    organs.mkdir(parents=True)
    for k in np.unique(values[values > 0]):
        organ = (values == k).astype(np.uint8)
        nib.save(nib.Nifti1Image(organ, label.affine), organs / f"organ{int(k)}.nii.gz")
    wrong = np.zeros((10, 10, 10), np.uint8)
    nib.save(nib.Nifti1Image(wrong, np.eye(4)), root / "masks" / "b.nii.gz")
    return root / "bank", root / "masks"


def test_import_and_named_propose_then_info(bank_and_masks: tuple[Path, Path]) -> None:
    bank_path, masks = bank_and_masks
    out = maskbank("propose", str(bank_path), "--import", str(masks), "--name", "organs", "--json")
    assert out.returncode == 1, out.stderr  # b failed, alone
    report = json.loads(out.stdout)
    rows = {r["scan_id"]: r for r in report["scans"]}
    assert rows["a"]["status"] == "ok" and rows["c"]["status"] == "skipped"
    assert rows["b"]["status"] == "failed" and "shape" in rows["b"]["reason"]

    bank = Bank.open(bank_path)
    scan = bank.scan("a")
    reader = ProposalReader(scan, "organs")
    label = np.asarray(scan.read("label"))
    assert reader.count == len(np.unique(label[label > 0]))
    got = sorted(int(reader.mask(i).sum()) for i in range(reader.count))
    assert got == sorted(int((label == k).sum()) for k in np.unique(label[label > 0]))
    assert bank.scan("b").proposal_sets == [] and bank.scan("c").proposal_sets == []

    slic = maskbank(
        "propose", str(bank_path), "--name", "slic", "--generators", "supervoxels", "--scans", "a"
    )
    assert slic.returncode == 0, slic.stderr
    bank = Bank.open(bank_path)
    assert bank.scan("a").proposal_sets == ["organs", "slic"]
    assert bank.row("a")["proposal_sets"]["slic"]["n"] > 0
    again = maskbank(
        "propose", str(bank_path), "--name", "slic", "--generators", "supervoxels", "--scans", "a"
    )
    assert again.returncode == 0 and "1 skipped" in again.stdout  # skip logic per set

    info = maskbank("info", str(bank_path), timeout=120)
    assert info.returncode == 0, info.stderr
    assert "proposal set" in info.stdout and "organs" in info.stdout and "slic" in info.stdout
    assert maskbank("verify", str(bank_path), timeout=120).returncode == 0


def test_import_usage_errors(bank_and_masks: tuple[Path, Path]) -> None:
    bank_path, masks = bank_and_masks
    no_name = maskbank("propose", str(bank_path), "--import", str(masks), timeout=120)
    assert no_name.returncode == 2 and "--name" in no_name.stderr
    default = maskbank(
        "propose", str(bank_path), "--import", str(masks), "--name", "default", timeout=120
    )
    assert default.returncode == 2 and "--force" in default.stderr
    bad = maskbank("propose", str(bank_path), "--name", "Bad-Name", timeout=120)
    assert bad.returncode == 2 and "proposal set name" in bad.stderr
