"""Writing a scan and reading it back: exact arrays, attributes, index rows, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank, NotABankError, ReadOnlyBankError, UnknownScanError
from tests.bank.conftest import SMALL, make_arrays, make_attrs


def test_round_trip_is_exact(bank: Bank) -> None:
    arrays = make_arrays(7)
    row = bank.write_scan("ct-007", arrays, make_attrs("ct-007"))
    scan = bank.scan("ct-007")
    for name, data in arrays.items():
        back = scan.read(name)
        assert back.dtype == data.dtype
        np.testing.assert_array_equal(back, data)
    assert scan.shape == arrays["image"].shape
    assert scan.spacing == (1.5, 1.5, 2.0)
    assert scan.modality == "ct" and scan.dataset == "synthetic"
    np.testing.assert_array_equal(scan.affine, np.diag([1.5, 1.5, 2.0, 1.0]))
    assert scan.attrs["normalisation"]["mean"] == -200.0
    assert scan.attrs["maskbank"]["format_version"] == 1
    assert scan.array_names == ["body", "image", "label"]
    assert scan.has("label") and not scan.has("proposals") and not scan.has("../x")
    assert row["has_label"] and row["n_proposals"] == 0 and row["nbytes"] > 0
    assert row["fingerprint"] == "cfg-abc123" and row["shape"] == list(arrays["image"].shape)


def test_reopen_reads_the_index_without_opening_groups(filled: Bank) -> None:
    again = Bank.open(filled.location)
    assert again.scan_ids == ["ct-001", "ct-002", "mr-001"]
    assert len(again) == 3 and "ct-002" in again and "nope" not in again
    assert [r["has_label"] for r in again.index] == [True, True, False]
    assert {r["dataset"] for r in again.index} == {"synthetic", "brains"}
    doc = json.loads((Path(filled.location) / "index.json").read_text())
    assert doc["format_version"] == 1 and len(doc["scans"]) == 3


def test_encoding_is_recorded_and_used(bank: Bank) -> None:
    bank.write_scan("s", make_arrays(0), make_attrs("s"))
    arr = bank.scan("s").array("image")
    assert arr.chunks == (16, 16, 16) and arr.shards == (32, 32, 32)
    assert Bank.open(bank.location).encoding == SMALL


def test_rewrite_replaces_cleanly(bank: Bank) -> None:
    bank.write_scan("s", make_arrays(1), make_attrs("s"))
    bank.write_scan("s", {"members_indptr": np.arange(4)}, {}, part="proposals")
    new = make_arrays(2, shape=(40, 40, 40))
    bank.write_scan("s", new, make_attrs("s"))
    scan = bank.scan("s")
    np.testing.assert_array_equal(scan.read("image"), new["image"])
    assert not scan.has("proposals"), "a new image invalidates its proposals"
    assert bank.row("s")["shape"] == [40, 40, 40]
    root = Path(bank.location)
    assert not any((root / ".staging").iterdir()) and not any((root / ".trash").iterdir())


def test_proposals_part_with_nested_names(filled: Bank) -> None:
    indptr = np.array([0, 2, 3, 5], dtype=np.int64)
    layer = np.arange(np.prod((72, 64, 48)), dtype=np.int32).reshape(72, 64, 48) % 11
    row = filled.write_scan(
        "ct-001",
        {"members_indptr": indptr, "layers/fine": layer, "table/voxels": np.array([5, 6, 7])},
        {"format": "test"},
        part="proposals",
    )
    assert row["n_proposals"] == 3 and row["proposals_nbytes"] > 0
    scan = filled.scan("ct-001")
    assert scan.has("proposals/layers/fine")
    np.testing.assert_array_equal(scan.read("proposals/layers/fine", (slice(3, 9),)), layer[3:9])
    assert scan.proposals_attrs["format"] == "test"
    assert scan.array("proposals/layers/fine").chunks == (16, 16, 16)
    np.testing.assert_array_equal(scan.read("image"), make_arrays(1)["image"])


def test_clear_errors(filled: Bank, tmp_path: Path) -> None:
    with pytest.raises(UnknownScanError, match="3 scans exist"):
        filled.scan("missing")
    (tmp_path / "not-a-bank").mkdir()
    (tmp_path / "not-a-bank" / "x.txt").write_text("hi")
    with pytest.raises(NotABankError, match="maskbank prepare"):
        Bank.open(tmp_path / "not-a-bank")
    with pytest.raises(NotABankError, match="maskbank prepare"):
        Bank.create(tmp_path / "not-a-bank")
    with pytest.raises(NotABankError, match="does not exist"):
        Bank.open(tmp_path / "nowhere")
    with pytest.raises(ReadOnlyBankError):
        Bank.open(filled.location).write_scan("x", make_arrays(0), make_attrs("x"))
    with pytest.raises(KeyError, match="has no array 'nope'"):
        filled.scan("ct-001").array("nope")
    with pytest.raises(UnknownScanError):
        filled.write_scan("ghost", {"members_indptr": np.arange(2)}, {}, part="proposals")


@pytest.mark.parametrize(
    ("scan_id", "arrays", "attrs", "match"),
    [
        ("../evil", None, None, "invalid scan id"),
        ("a@b", None, None, "invalid scan id"),
        ("ok", {"body": np.zeros((4, 4, 4), bool)}, None, "must include 'image'"),
        ("ok", {"image": np.full((4, 4, 4), np.nan, np.float16)}, None, "NaN"),
        (
            "ok",
            {"image": np.zeros((4, 4, 4), np.float16), "body": np.zeros((4, 4, 5), bool)},
            None,
            "scan grid",
        ),
        ("ok", None, {"maskbank": 1}, "reserved"),
        ("ok", None, {"bad": float("inf")}, "finite"),
    ],
)
def test_bad_input_is_refused_before_writing(bank, scan_id, arrays, attrs, match) -> None:
    arrays = arrays or {"image": np.zeros((4, 4, 4), np.float16)}
    attrs = attrs or make_attrs("ok")
    with pytest.raises(ValueError, match=match):
        bank.write_scan(scan_id, arrays, attrs)
    assert len(bank) == 0 and not any((Path(bank.location) / ".staging").iterdir())


def test_reports(bank: Bank) -> None:
    first = bank.write_report("prepare", {"ok": 3, "failed": [], "t": np.float64(1.5)})
    second = bank.write_report("prepare", {"ok": 4})
    assert first != second and Path(first).name.startswith("prepare-")
    assert json.loads(Path(first).read_text()) == {"ok": 3, "failed": [], "t": 1.5}
    assert [Path(p).name for p in bank.reports("prepare")] == [Path(first).name, Path(second).name]


def test_bank_and_scan_pickle_by_reopening(filled: Bank) -> None:
    import pickle

    scan = pickle.loads(pickle.dumps(filled.scan("ct-001")))
    np.testing.assert_array_equal(
        scan.read("label", (slice(20, 22),)), make_arrays(1)["label"][20:22]
    )
    reader = pickle.loads(pickle.dumps(Bank.open(filled.location)))
    writer = pickle.loads(pickle.dumps(filled))
    assert not reader.writable and writer.writable and reader.scan_ids == filled.scan_ids


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_finite_check_sees_every_non_finite_value(dtype):
    from maskbank.bank.bank import _all_finite

    ok = np.array([0.0, -0.0, 1e-7, -65504.0, 65504.0], dtype)
    assert _all_finite(ok) and _all_finite(ok[:0])
    for bad in (np.nan, np.inf, -np.inf):
        assert not _all_finite(np.append(ok, dtype(bad)).reshape(2, 3)[:, ::-1])
