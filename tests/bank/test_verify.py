"""verify() finds real damage: flipped bytes, lost shard files, missing arrays, stale index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank
from tests.bank.conftest import make_arrays, make_attrs


def scan_dir(bank: Bank, scan_id: str) -> Path:
    return Path(bank.location) / "scans" / scan_id


def test_healthy_bank_has_no_problems(filled: Bank) -> None:
    filled.write_scan("ct-001", {"members_indptr": np.arange(6)}, {}, part="proposals")
    assert filled.verify() == []


def test_corrupted_shard_bytes_are_found(filled: Bank) -> None:
    shard = scan_dir(filled, "ct-002") / "label" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = filled.verify()
    assert problems and all(p.startswith("ct-002: label:") for p in problems), problems


def test_deleted_shard_file_is_named_by_verify_and_readers(filled: Bank) -> None:
    """Zarr decodes a missing shard as zeros; the bank writes every shard, so it is an error."""
    from maskbank.bank.chunk_reader import ShardedBloscReader, local_member
    from maskbank.bank.errors import MissingChunkError

    scan = filled.scan("ct-001")
    reader = ShardedBloscReader.of_local(*local_member(scan.group, "image"))
    assert reader is not None
    reader.read_chunks([(0, 0, 0)])  # shard index (0,0,0) cached, as in a sampler
    (scan_dir(filled, "ct-001") / "image" / "c" / "1" / "0" / "0").unlink()
    problems = filled.verify()
    assert any("ct-001: image:" in p and "image/c/1/0/0 is missing" in p for p in problems)
    with pytest.raises(MissingChunkError, match="image/c/1/0/0"):
        scan.read("image", np.s_[40:41, 0:2, 0:2])  # zarr path: shard (1, 0, 0)
    with pytest.raises(MissingChunkError, match="image/c/1/0/0"):
        reader.read_chunks([(2, 0, 0)])  # direct shard reader (16^3 chunks, 32^3 shards)
    with pytest.raises(MissingChunkError):
        ShardedBloscReader.of(scan.array("image")).read_chunks([(2, 0, 0)])
    np.testing.assert_array_equal(  # the rest of the scan still reads
        scan.read("image", np.s_[0:8]), make_arrays(1)["image"][0:8]
    )


def test_missing_array_and_unrecorded_array(filled: Bank) -> None:
    shutil.rmtree(scan_dir(filled, "ct-001") / "body")
    shutil.copytree(scan_dir(filled, "ct-002") / "body", scan_dir(filled, "ct-002") / "extra")
    problems = filled.verify()
    assert "ct-001: array 'body' is recorded but missing" in problems
    assert "ct-002: array 'extra' is on disk but not recorded in attributes" in problems


def test_index_mismatches(filled: Bank) -> None:
    index_path = Path(filled.location) / "index.json"
    doc = json.loads(index_path.read_text())
    doc["scans"][0]["fingerprint"] = "stale"
    doc["scans"].append({**doc["scans"][1], "scan_id": "ghost"})
    index_path.write_text(json.dumps(doc))
    shutil.copytree(scan_dir(filled, "mr-001"), scan_dir(filled, "mr-002"))
    problems = Bank.open(filled.location).verify()
    assert any(p.startswith("ct-001: index row differs") and "fingerprint" in p for p in problems)
    assert "ghost: listed in index.json but its group is missing" in problems
    assert "mr-002: group exists but index.json does not list it" in problems
    writer = Bank.open(filled.location, mode="a")
    writer.rebuild_index()
    assert writer.verify() == []


def test_incomplete_attrs_and_bad_values(bank: Bank) -> None:
    attrs = make_attrs("a")
    del attrs["source_sha256"]
    bank.write_scan("a", make_arrays(0), attrs)
    bank.write_scan("b", make_arrays(1), make_attrs("b"))
    # Sneak an inf into b's image behind the bank's back (writes refuse NaN/inf).
    arr = Bank.open(bank.location).scan("b").array("image")
    import zarr

    writable = zarr.open_array(arr.store.with_read_only(False), path=arr.path, mode="r+")
    writable[1, 2, 3] = np.inf
    problems = bank.verify()
    assert "a: missing attribute 'source_sha256'" in problems
    assert any(p.startswith("b: image: NaN/inf") for p in problems), problems


def test_shallow_and_selective_verify(filled: Bank) -> None:
    (scan_dir(filled, "ct-001") / "image" / "c" / "1" / "0" / "0").unlink()
    shutil.rmtree(scan_dir(filled, "ct-002") / "body")
    shallow = filled.verify(deep=False)
    assert "ct-002: array 'body' is recorded but missing" in shallow
    assert not any("checksum" in p for p in shallow)  # only decoding can see a lost shard
    assert filled.verify(scan_ids=["mr-001", "nope"]) == ["nope: no such scan"]
    deep = filled.verify(scan_ids=["ct-001"])
    assert any("ct-001: image:" in p and "is missing" in p for p in deep)
    assert not any(p.startswith("ct-002") for p in deep)


def test_delete_scan(filled: Bank) -> None:
    filled.delete_scan("ct-002")
    assert "ct-002" not in filled and not scan_dir(filled, "ct-002").exists()
    assert Bank.open(filled.location).scan_ids == ["ct-001", "mr-001"]
    assert filled.verify() == []


def test_repair_removes_a_damaged_scan_so_a_rerun_rebuilds_it(filled: Bank, capsys) -> None:
    """Prepare skips a scan whose attributes are unchanged, so repair must remove one whose
    data no longer decode: then re-running prepare on the same inputs writes it again."""
    import argparse

    from maskbank.flows.commands import verify as verify_cmd

    shard = scan_dir(filled, "ct-001") / "image" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a compressed chunk
    shard.write_bytes(bytes(data))
    args = argparse.Namespace(bank=filled.location, repair=False)
    assert verify_cmd.run(args) == 1
    assert verify_cmd.run(argparse.Namespace(bank=filled.location, repair=True)) == 0
    assert "removed scan ct-001" in capsys.readouterr().out
    repaired = Bank.open(filled.location)
    assert "ct-001" not in repaired and repaired.verify() == []
    assert len(repaired) == len(filled.scan_ids) - 1
