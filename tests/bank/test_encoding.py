"""Encoding: stored with the bank, and the proposals part compressed harder than the scan."""

import json

import numpy as np

from maskbank.bank import Bank
from maskbank.bank.writing import Encoding

from .conftest import make_arrays


def _clevel(bank_root, *parts) -> int:
    meta = json.loads(bank_root.joinpath("scans", *parts, "zarr.json").read_text())
    (shard,) = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"] or [None]
    codecs = shard["configuration"]["codecs"] if shard else meta["codecs"]
    (blosc,) = [c for c in codecs if c["name"] == "blosc"]
    return blosc["configuration"]["clevel"]


def test_old_encoding_records_keep_level_5_for_proposals():
    """Banks written before `proposals_clevel` existed decode to the same behaviour."""
    old = Encoding.from_dict({"chunk": 64, "max_shard": 512, "cname": "zstd", "clevel": 5})
    assert old.for_part("proposals").clevel == 5 and old.for_part(None).clevel == 5
    assert Encoding().clevel == 2 and Encoding().for_part("proposals").clevel == 5


def test_scan_and_proposals_parts_use_their_own_levels(tmp_path):
    bank = Bank.create(tmp_path / "bank", Encoding(chunk=16, max_shard=32, clevel=1))
    arrays = make_arrays()
    bank.write_scan("s1", arrays, {"spacing": [1.5] * 3})
    layer = np.zeros(arrays["image"].shape, np.uint16)
    layer[10:30, 10:30, 10:30] = 1
    bank.write_scan("s1", {"layers/a": layer}, {"count": 1}, part="proposals")
    root = tmp_path / "bank"
    assert _clevel(root, "s1", "image") == 1
    assert _clevel(root, "s1", "proposals", "layers", "a") == 5
    reopened = Bank.open(root)
    assert reopened.encoding == Encoding(chunk=16, max_shard=32, clevel=1)
    np.testing.assert_array_equal(reopened.scan("s1").read("image"), arrays["image"])
