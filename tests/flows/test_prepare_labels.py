"""Labelled banks: `maskbank prepare --label-names` and manifest metadata, read back from the bank."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.flows.cli import main
from maskbank.flows.inputs import collect_inputs
from maskbank.flows.prepare import prepare_record
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.phantom import NAMES
from tests.flows.scans import write_phantom

CONFIG = PrepareConfig(spacing=(3.0, 3.0, 3.0)).to_dict()


def _itksnap(names: dict[int, str]) -> str:
    rows = ['    0     0    0    0        0  0  0    "Clear Label"']
    rows += [f'{v:5d}   255    0    0        1  1  1    "{n}"' for v, n in names.items()]
    return "# ITK-SnAP Label Description File\n" + "\n".join(rows) + "\n"


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """Two labelled phantoms; case1's row names its own JSON names file."""
    folder = tmp_path / "in"
    for i in range(2):
        write_phantom(folder, f"case{i}", "ct", seed=i)
    (folder / "organs.txt").write_text(_itksnap({**NAMES, 99: "not in any scan"}))
    (folder / "case1_names.json").write_text(json.dumps({v: n.upper() for v, n in NAMES.items()}))
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "label_names", "diagnosis", "age"])
        writer.writerow(["case0.nii.gz", "case0_label.nii.gz", "", "healthy", "63"])
        writer.writerow(["case1.nii.gz", "case1_label.nii.gz", "case1_names.json", "", "70"])
    return folder


def test_label_names_and_metadata_reach_the_bank(
    prefect_api: str, labelled: Path, tmp_path: Path
) -> None:
    bank_dir = tmp_path / "bank"
    manifest = labelled / "manifest.csv"
    names_file = labelled / "organs.txt"
    argv = ["prepare", str(manifest), "--bank", str(bank_dir), "--spacing", "3"]
    assert main([*argv, "--label-names", str(names_file), "--workers", "1", "--no-progress"]) == 0

    bank = Bank.open(bank_dir)
    case0, case1 = bank.scan("case0"), bank.scan("case1")
    present = [int(v) for v in np.unique(case0.read("label")) if v]
    assert case0.label_names == {v: NAMES[v] for v in present}  # no 0, no 99
    assert case1.label_names == {
        int(v): NAMES[int(v)].upper() for v in np.unique(case1.read("label")) if v
    }
    assert case0.metadata == {"diagnosis": "healthy", "age": "63"}
    assert case1.metadata == {"age": "70"}  # empty cells are left out

    # The skip check hashes the names file: editing it redoes only the scans it names.
    items = {s.scan_id: s.to_dict() for s in collect_inputs([str(manifest)], None, str(names_file))}
    assert prepare_record("case1", items["case1"], str(bank_dir), CONFIG)["status"] == "skipped"
    names_file.write_text(_itksnap({**NAMES, 3: "hepar"}))
    redo = prepare_record("case0", items["case0"], str(bank_dir), CONFIG)
    assert (redo["status"], redo["note"]) == ("ok", "label names changed")
    assert Bank.open(bank_dir).scan("case0").label_names[3] == "hepar"
    assert prepare_record("case1", items["case1"], str(bank_dir), CONFIG)["status"] == "skipped"


def test_malformed_label_names_is_a_usage_error(
    labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = labelled / "bad.txt"
    bad.write_text("1 liver\n")
    argv = ["prepare", str(labelled), "--bank", str(tmp_path / "b"), "--label-names", str(bad)]
    assert main(argv) == 2
    assert f"{bad}: line 1" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
