"""record_scan_attrs: a writer's records merged into a published scan, arrays untouched."""

from __future__ import annotations

import pytest

from maskbank.bank import Bank
from maskbank.bank.errors import StaleScanError
from maskbank.bank.writing import record_scan_attrs
from tests.bank.conftest import make_arrays, make_attrs


def test_records_merge_into_the_scan_and_its_row(filled: Bank) -> None:
    before = filled.scan("ct-001")
    token = before.token
    image = before.read("image")
    assert record_scan_attrs(filled, "ct-001", {"source_stat": {"size": 3}}, scan_token=token)
    after = Bank.open(filled.location).scan("ct-001")
    assert after.attrs["source_stat"] == {"size": 3} and after.token == token
    assert (after.read("image") == image).all()
    assert filled.verify(["ct-001"], deep=True) == []
    with pytest.raises(StaleScanError):
        record_scan_attrs(filled, "ct-001", {"x": 1}, scan_token="not-its-token")
    with pytest.raises(ValueError, match="reserved"):
        record_scan_attrs(filled, "ct-001", {"maskbank": {}})


def test_a_read_only_bank_records_nothing(filled: Bank) -> None:
    assert not record_scan_attrs(Bank.open(filled.location), "ct-001", {"x": 1})


def test_an_object_store_bank_records_nothing(s3) -> None:
    """Its versions are never modified once written: the caller rewrites instead."""
    bank = Bank.create(s3.url(), storage_options=s3.options)
    bank.write_scan("s", make_arrays(0, (12, 12, 12)), make_attrs("s"))
    assert not record_scan_attrs(bank, "s", {"x": 1})
    assert "x" not in bank.scan("s").attrs
