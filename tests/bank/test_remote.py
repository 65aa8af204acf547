"""Reading through fsspec URLs: memory:// (an object store stand-in) and file://."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from maskbank.bank import Bank, BankError, NotABankError
from tests.bank.conftest import make_arrays


@pytest.fixture
def memory_url(filled: Bank):
    fs = fsspec.filesystem("memory")
    name = f"/bank-{uuid.uuid4().hex}"
    fs.put(str(Path(filled.location)) + "/", name, recursive=True)
    yield f"memory://{name}"
    fs.rm(name, recursive=True)


def test_memory_url_reads_index_attrs_and_crops(memory_url: str, filled: Bank) -> None:
    remote = Bank.open(memory_url)
    assert remote.scan_ids == filled.scan_ids
    assert remote.summary()["bytes"] == filled.summary()["bytes"]
    scan = remote.scan("ct-001")
    roi = (slice(10, 40), slice(0, 20), slice(30, 48))
    np.testing.assert_array_equal(scan.read("image", roi), make_arrays(1)["image"][roi])
    assert scan.spacing == (1.5, 1.5, 2.0)
    assert remote.verify() == []
    with pytest.raises(BankError, match="only local paths"):
        Bank.open(memory_url, mode="a")


def test_file_url(filled: Bank) -> None:
    remote = Bank.open("file://" + str(Path(filled.location).resolve()))
    np.testing.assert_array_equal(
        remote.scan("mr-001").read("body"), make_arrays(3, (40, 36, 30))["body"]
    )


def test_memory_url_that_is_not_a_bank() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/plain/readme.txt", b"hello")
    with pytest.raises(NotABankError, match="maskbank prepare"):
        Bank.open("memory://plain")
