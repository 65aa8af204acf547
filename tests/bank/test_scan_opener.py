"""Bank.opener: scans opened by id from paths fixed once, without the bank's index."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest

from maskbank.bank import Bank, BankError, UnknownScanError
from maskbank.bank.scan_opener import ScanOpener

from .conftest import make_arrays


def test_an_opener_reads_what_the_bank_reads_without_its_index(filled: Bank) -> None:
    opener = filled.opener(["ct-001", "mr-001"])
    assert len(opener) == 2 and "ct-001" in opener and "ct-002" not in opener
    (filled.local_root / "index.json").write_text("{ not json")
    shutil.rmtree(filled.local_root / "index-rows", ignore_errors=True)
    copy = pickle.loads(pickle.dumps(opener))  # what a spawned worker gets
    for reader in (opener, copy):
        view = reader.scan("ct-001")
        np.testing.assert_array_equal(
            view.read("label", (slice(20, 22),)), make_arrays(1)["label"][20:22]
        )
        assert reader.scan("mr-001").shape == (40, 36, 30)
    view = pickle.loads(pickle.dumps(copy.scan("ct-001")))  # a view reopens through it
    assert view.shape == (72, 64, 48)


def test_scans_outside_the_opener_or_gone_from_storage_are_refused(filled: Bank) -> None:
    opener = filled.opener(["ct-001", "ct-002"])
    with pytest.raises(UnknownScanError):
        opener.scan("mr-001")  # in the bank, not in the opener
    with pytest.raises(UnknownScanError):
        filled.opener(["nope"])
    shutil.rmtree(filled.local_root / filled.scan_path("ct-002"))
    with pytest.raises(BankError, match="start it again"):
        opener.scan("ct-002")


def test_a_pickled_opener_carries_no_credentials() -> None:
    opener = ScanOpener("s3://b/bank", {"endpoint_url": "http://x", "secret": "s"}, {"a": "p"})
    _, (location, options, paths) = opener.__reduce__()
    assert location == "s3://b/bank" and paths == {"a": "p"}
    assert options == {"endpoint_url": "http://x"}
