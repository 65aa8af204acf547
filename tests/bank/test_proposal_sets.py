"""Several named proposal sets on one scan: each its own part, rebuilt, counted and verified."""

from __future__ import annotations

import numpy as np
import pytest

from maskbank.bank import Bank, NoProposalsError
from maskbank.bank.layout import check_set_name, parse_temp_name, proposals_part, temp_name
from maskbank.bank.sampling import ProposalReader
from maskbank.bank.writing import write_proposals
from maskbank.pipeline.proposals.external import from_label_map, from_masks
from maskbank.pipeline.proposals.features import compute_features
from tests.bank.conftest import make_attrs
from tests.s3_server import S3

SHAPE = (32, 28, 24)


def _scan_arrays() -> dict:
    rng = np.random.default_rng(3)
    return {"image": rng.normal(size=SHAPE).astype(np.float32), "body": np.ones(SHAPE, bool)}


def _two_sets(arrays: dict):
    lm = np.zeros(SHAPE, np.int32)
    lm[2:12, 2:12, 2:12] = 1
    lm[14:30, 4:20, 6:22] = 2
    box = np.zeros(SHAPE, bool)
    box[5:25, 5:25, 5:20] = True
    spacing = (1.5, 1.5, 1.5)
    default = compute_features(from_label_map(lm, "engine"), arrays["image"], None, spacing)
    organs = compute_features(from_masks([box], "imported"), arrays["image"], None, spacing)
    return default, organs, lm, box


def _fill(bank: Bank):
    arrays = _scan_arrays()
    bank.write_scan("s1", arrays, make_attrs("s1"))
    default, organs, lm, box = _two_sets(arrays)
    write_proposals(bank, "s1", default)
    write_proposals(bank, "s1", organs, name="organs")
    return lm, box


def _check_two_sets(bank: Bank, lm: np.ndarray, box: np.ndarray) -> None:
    scan = bank.scan("s1")
    assert scan.proposal_sets == ["default", "organs"]
    default, organs = ProposalReader(scan), ProposalReader(scan, "organs")
    assert default.count == 2 and organs.count == 1
    np.testing.assert_array_equal(default.mask(0) | default.mask(1), lm > 0)
    np.testing.assert_array_equal(organs.mask(0), box)
    assert organs.layer_array_name(0).startswith("proposals-organs/")
    row = bank.row("s1")
    assert row["n_proposals"] == 2
    assert {k: v["n"] for k, v in row["proposal_sets"].items()} == {"default": 2, "organs": 1}
    assert row["proposal_sets"]["organs"]["bytes"] > 0
    assert row["proposal_sets"]["default"]["bytes"] == row["proposals_nbytes"]
    sets = bank.summary()["proposal_sets"]
    assert sets["organs"] == {"scans": 1, "proposals": 1, "bytes": sets["organs"]["bytes"]}
    assert len(bank.proposal_table("s1", "organs")) == 1
    assert bank.verify() == []


def test_two_sets_each_rebuild_their_own_masks(tmp_path):
    bank = Bank.create(tmp_path / "bank")
    lm, box = _fill(bank)
    _check_two_sets(bank, lm, box)
    _check_two_sets(Bank.open(tmp_path / "bank"), lm, box)  # the index on disk says the same
    with pytest.raises(NoProposalsError, match=r"'slic'.*'default', 'organs'"):
        ProposalReader(bank.scan("s1"), "slic")


def test_rewriting_the_scan_drops_every_set(tmp_path):
    bank = Bank.create(tmp_path / "bank")
    _fill(bank)
    bank.write_scan("s1", _scan_arrays(), make_attrs("s1"))
    assert bank.scan("s1").proposal_sets == []
    assert bank.row("s1")["proposal_sets"] == {} and bank.row("s1")["n_proposals"] == 0
    assert bank.verify() == []


def test_verify_reports_a_broken_named_set(tmp_path):
    bank = Bank.create(tmp_path / "bank")
    _fill(bank)
    indptr = tmp_path / "bank" / "scans" / "s1" / "proposals-organs" / "members_indptr"
    for chunk in (p for p in indptr.rglob("*") if p.is_file() and p.name != "zarr.json"):
        chunk.write_bytes(b"garbage")
    problems = bank.verify()
    assert any("proposals-organs/members_indptr" in p for p in problems), problems


def test_set_names_and_parts():
    assert proposals_part() == "proposals" and proposals_part("slic") == "proposals-slic"
    assert parse_temp_name(temp_name("s1", "proposals-slic", "t")) == ("s1", "proposals-slic", "t")
    assert parse_temp_name(temp_name("s1", "proposals-Bad", "t")) is None
    for bad in ("", "Slic", "a-b", "x" * 33, "_x"):
        with pytest.raises(ValueError, match="proposal set name"):
            check_set_name(bad)


def test_two_sets_on_s3_keep_each_other(s3: S3):
    bank = Bank.create(s3.url(), storage_options=s3.options)
    lm, box = _fill(bank)
    _check_two_sets(Bank.open(s3.url(), storage_options=s3.options), lm, box)
    arrays = _scan_arrays()
    write_proposals(bank, "s1", _two_sets(arrays)[0])  # a new version copies the organs set
    _check_two_sets(Bank.open(s3.url(), storage_options=s3.options), lm, box)
