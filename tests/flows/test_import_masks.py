"""`maskbank propose --import MANIFEST`: label maps named by a .csv or .jsonl manifest
(scan_id,path), imported end to end into a real bank from real NIfTI files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.sampling import ProposalReader
from maskbank.flows.import_masks import mask_sources
from maskbank.flows.report import format_propose_report
from tests.flows.cli_run import maskbank
from tests.flows.scans import phantom_bank


@pytest.fixture(scope="module")
def bank_and_labels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Scans a, b, c prepared from phantoms; their source-grid label maps in inputs/."""
    root = tmp_path_factory.mktemp("manifest")
    return phantom_bank(root, "inputs", "manifest"), root / "inputs"


def _import(bank: Path, manifest: Path, name: str) -> dict:
    out = maskbank("propose", str(bank), "--import", str(manifest), "--name", name, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _check_imported(bank_path: Path, name: str, report: dict, inputs: Path) -> None:
    """a and b hold one proposal per label value, voxel for voxel the prepared label; c,
    absent from the manifest, is skipped; the manifest's unknown scan is reported."""
    rows = {r["scan_id"]: r for r in report["scans"]}
    assert rows["a"]["status"] == "ok" and rows["b"]["status"] == "ok"
    assert rows["c"]["status"] == "skipped" and "no masks" in rows["c"]["reason"]
    assert report["unknown_scans"] == ["not-in-bank"]
    bank = Bank.open(bank_path)
    for scan_id in ("a", "b"):
        scan = bank.scan(scan_id)
        label = np.asarray(scan.read("label"))
        reader = ProposalReader(scan, name)
        values = np.unique(label[label > 0])
        assert reader.count == len(values) == rows[scan_id]["n_proposals"]
        for i in range(reader.count):
            mask = reader.mask(i)
            (value,) = np.unique(label[mask])  # each proposal is exactly one label region
            assert np.array_equal(mask, label == value)
        recorded = Path(reader.attrs["imported_from"])
        assert (
            recorded.is_absolute()
            and recorded.resolve() == (inputs / f"{scan_id}_label.nii.gz").resolve()
        )
    assert name not in bank.scan("c").proposal_sets


def test_csv_manifest(bank_and_labels: tuple[Path, Path]) -> None:
    """A spreadsheet's CSV: BOM, spaces after commas, paths relative to the manifest."""
    bank, inputs = bank_and_labels
    manifest = inputs.parent / "csv" / "labels.csv"
    manifest.parent.mkdir()
    rel = Path("..") / inputs.name
    manifest.write_text(
        "\ufeffscan_id, path\n"
        f"a, {rel / 'a_label.nii.gz'}\n"
        f"b,{inputs / 'b_label.nii.gz'}\n"  # absolute
        f"not-in-bank,{inputs / 'c_label.nii.gz'}\n",
        encoding="utf-8",
    )
    report = _import(bank, manifest, "csvlabels")
    _check_imported(bank, "csvlabels", report, inputs)
    table = format_propose_report({"report_path": "r.json", **report})
    assert "not in the bank, ignored: not-in-bank" in table  # not only in the JSON
    info = maskbank("info", str(bank), timeout=120)
    assert info.returncode == 0 and "csvlabels" in info.stdout, info.stderr


def test_jsonl_manifest(bank_and_labels: tuple[Path, Path]) -> None:
    bank, inputs = bank_and_labels
    rows = [
        {"scan_id": "a", "path": str(inputs / "a_label.nii.gz")},
        {"scan_id": "b", "path": str(Path("..") / inputs.name / "b_label.nii.gz")},
        {"scan_id": "not-in-bank", "path": str(inputs / "c_label.nii.gz")},
    ]
    manifest = inputs.parent / "jsonl" / "labels.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    report = _import(bank, manifest, "jsonllabels")
    _check_imported(bank, "jsonllabels", report, inputs)


def test_a_scan_listed_twice_is_a_usage_error(
    bank_and_labels: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two rows for one scan used to keep the last one silently (the first masks lost)."""
    bank, inputs = bank_and_labels
    manifest = tmp_path / "twice.csv"
    manifest.write_text(
        f"scan_id,path\na,{inputs / 'a_label.nii.gz'}\na,{inputs / 'b_label.nii.gz'}\n"
    )
    out = maskbank("propose", str(bank), "--import", str(manifest), "--name", "twice")
    assert out.returncode == 2 and "lines 2 and 3" in out.stderr, out.stderr
    assert "twice" not in Bank.open(bank).scan("a").proposal_sets


def test_manifest_rows_are_checked(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    missing.write_text("scan_id,path\na,\n")
    with pytest.raises(ValueError, match="line 2: every row needs scan_id and path"):
        mask_sources(missing)
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('["a", "a.nii.gz"]\n')
    with pytest.raises(ValueError, match="line 1 is not a JSON object"):
        mask_sources(not_object)
