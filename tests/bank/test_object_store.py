"""A bank on S3 (moto's server on loopback): same bytes as on disk, safe commits, the readers.

Docs: docs/bank-format.md, "Object storage".
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank import object_store as obj
from maskbank.bank.errors import StaleScanError
from maskbank.bank.layout import ROWS_DIR, parse_versioned
from maskbank.bank.sampling import ChunkCache, ProposalReader
from maskbank.flows.demo_bank import build_phantom_bank
from tests.bank.conftest import SMALL, make_arrays, make_attrs
from tests.s3_server import S3

# Attributes that differ between any two writes of the same data (time, random versions).
VOLATILE = ("written_at", "token", "scan_token", "created_at")


def _normalised(raw: bytes, name: str) -> bytes:
    """zarr.json without the per-write fields; chunk and shard objects as they are."""
    if not name.endswith("zarr.json"):
        return raw
    doc = json.loads(raw)
    info = (doc.get("attributes") or {}).get("maskbank") or {}
    for key in VOLATILE:
        info.pop(key, None)
    return json.dumps(doc, sort_keys=True).encode()


def _local_objects(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): _normalised(p.read_bytes(), p.name)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _s3_objects(s3: S3, prefix: str) -> dict[str, bytes]:
    fs = s3.filesystem()
    base = f"{s3.bucket}/{prefix}"
    return {key[len(base) + 1 :]: _normalised(fs.cat_file(key), key) for key in fs.find(base)}


@pytest.fixture
def s3_env(s3: S3, monkeypatch) -> S3:
    """The endpoint in MASKBANK_STORAGE_OPTIONS: what DataLoader and Dask workers inherit."""
    monkeypatch.setenv("MASKBANK_STORAGE_OPTIONS", s3.options_json)
    return s3


def test_bank_on_s3_is_byte_identical_to_the_local_bank(s3_env: S3, tmp_path: Path) -> None:
    local = build_phantom_bank(tmp_path / "bank", n_scans=2, shape=(48, 40, 32))
    remote = build_phantom_bank(s3_env.url(), n_scans=2, shape=(48, 40, 32))
    assert remote.scan_ids == local.scan_ids
    for sid in local.scan_ids:
        version = remote.version_of(sid)
        assert version is not None and local.version_of(sid) is None
        want = _local_objects(Path(local.location) / "scans" / sid)
        got = _s3_objects(s3_env, f"bank/scans/{sid}@{version}")
        assert sorted(got) == sorted(want)
        assert any("/c/" in k for k in want)  # shards are compared, not only metadata
        for key in want:
            assert got[key] == want[key], key
        skip = ("written_at", "version")
        assert {k: v for k, v in remote.row(sid).items() if k not in skip} == {
            k: v for k, v in local.row(sid).items() if k not in skip
        }
    assert remote.verify() == []


def test_notebook_api_and_sampler_reads_on_s3(s3_env: S3, tmp_path: Path) -> None:
    build_phantom_bank(s3_env.url(), n_scans=1, shape=(48, 40, 32))
    local = build_phantom_bank(tmp_path / "bank", n_scans=1, shape=(48, 40, 32))
    bank = Bank.open(s3_env.url())  # options from MASKBANK_STORAGE_OPTIONS
    sid = bank.scan_ids[0]
    assert list(bank.scans["scan_id"]) == [sid]
    table = bank.proposal_table(sid)
    assert len(table) == len(local.proposal_table(sid)) > 0
    scan, ref = bank.scan(sid), local.scan(sid)
    np.testing.assert_array_equal(scan.image[:, :, 7], ref.image[:, :, 7])
    np.testing.assert_array_equal(scan.proposal_masks([0, 1]), ref.proposal_masks([0, 1]))
    roi = (slice(3, 40), slice(10, 30), slice(0, 20))
    got = ChunkCache(0).read(scan, "image", roi)
    np.testing.assert_array_equal(got, ref.read("image", roi))
    assert ProposalReader(scan).count == ProposalReader(ref).count
    again = pickle.loads(pickle.dumps(scan))
    np.testing.assert_array_equal(again.read("body", roi), ref.read("body", roi))


def test_writers_of_different_scans_lose_no_row(s3: S3) -> None:
    from concurrent.futures import ThreadPoolExecutor

    Bank.create(s3.url(), encoding=SMALL, storage_options=s3.options)

    def write(i: int) -> None:
        own = Bank.open(s3.url(), mode="a", storage_options=s3.options)  # one writer each
        own.write_scan(f"s-{i}", make_arrays(i, (20, 18, 16)), make_attrs(f"s-{i}"))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(8)))
    bank = Bank.open(s3.url(), storage_options=s3.options)
    assert bank.scan_ids == [f"s-{i}" for i in range(8)]
    assert bank.verify() == []


def test_two_writers_of_one_scan_id_never_mix(s3: S3) -> None:
    """Each version is written under its own prefix: whichever wins, it wins whole."""
    from concurrent.futures import ThreadPoolExecutor

    Bank.create(s3.url(), encoding=SMALL, storage_options=s3.options)
    data = {seed: make_arrays(seed, (40, 36, 30)) for seed in (1, 2)}

    def write(seed: int) -> None:
        own = Bank.open(s3.url(), mode="a", storage_options=s3.options)
        for _ in range(3):
            own.write_scan("same", data[seed], {**make_attrs("same"), "seed": seed})

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, (1, 2)))
    bank = Bank.open(s3.url(), storage_options=s3.options)
    scan = bank.scan("same")
    seed = scan.attrs["seed"]
    for name, want in data[seed].items():
        np.testing.assert_array_equal(scan.read(name), want)
    assert bank.verify() == []
    # the losing versions are unindexed objects only, and cleanup removes them
    assert bank.leftovers() and all(parse_versioned(p.split("/")[-1]) for p in bank.leftovers())
    writer = Bank.open(s3.url(), mode="a", storage_options=s3.options)
    assert writer.recover(grace_s=0)
    assert writer.leftovers() == [] and writer.verify() == []
    assert writer.scan("same").attrs["seed"] == seed


def test_proposals_of_a_rewritten_scan_are_refused(s3: S3) -> None:
    bank = Bank.create(s3.url(), encoding=SMALL, storage_options=s3.options)
    bank.write_scan("a", make_arrays(1, (20, 18, 16)), make_attrs("a"))
    token = bank.scan("a").token
    bank.write_scan("a", make_arrays(2, (20, 18, 16)), make_attrs("a"))
    props = {"members_indptr": np.array([0, 1]), "members": np.array([3])}
    with pytest.raises(StaleScanError):
        bank.write_scan("a", props, {}, part="proposals", scan_token=token)
    row = bank.write_scan("a", props, {}, part="proposals", scan_token=bank.scan("a").token)
    assert row["n_proposals"] == 1
    assert Bank.open(s3.url(), storage_options=s3.options).verify() == []


def test_no_credentials_in_pickles_or_reports(s3: S3) -> None:
    options = {**s3.options, "key": "testing-key-id", "secret": "testing-secret-value"}
    bank = Bank.create(s3.url(), encoding=SMALL, storage_options=options)
    bank.write_scan("a", make_arrays(1, (20, 18, 16)), make_attrs("a"))
    path = bank.write_report("prepare", {"bank": bank.location, "ok": True})
    blob = pickle.dumps(bank) + pickle.dumps(bank.scan("a")) + repr(bank).encode()
    fs = s3.filesystem()
    stored = b"".join(fs.cat_file(k) for k in fs.find(s3.bucket))
    for secret in (b"testing-secret-value", b"testing-key-id"):
        assert secret not in blob and secret not in stored
    assert path.startswith(s3.url()) and bank.reports("prepare")
    again = pickle.loads(pickle.dumps(bank))  # credentials come from the environment there
    assert again.scan_ids == ["a"] and again.writable


def test_snapshot_lag_is_corrected_by_the_row_listing(s3: S3) -> None:
    bank = Bank.create(s3.url(), encoding=SMALL, storage_options=s3.options)
    for i in range(3):
        bank.write_scan(f"s-{i}", make_arrays(i, (12, 12, 12)), make_attrs(f"s-{i}"))
    fs = s3.filesystem()
    snapshot = json.loads(fs.cat_file(f"{s3.bucket}/bank/index.json"))
    assert snapshot["scans"] == []  # fewer writes than SNAPSHOT_SLACK: index.json lags
    assert len(fs.ls(f"{s3.bucket}/bank/{ROWS_DIR}")) == 3
    reader = Bank.open(s3.url(), storage_options=s3.options)
    assert reader.scan_ids == ["s-0", "s-1", "s-2"]
    one = obj.list_rows(
        bank._backend.fs, bank._backend.fs_root, "s-1"
    )  # a writer lists by key prefix
    assert one.live == {"s-1": reader.version_of("s-1")} and not one.superseded
    bank.rebuild_index()
    snapshot = json.loads(fs.cat_file(f"{s3.bucket}/bank/index.json"))
    assert [r["scan_id"] for r in snapshot["scans"]] == ["s-0", "s-1", "s-2"]
    bank.delete_scan("s-1")
    assert Bank.open(s3.url(), storage_options=s3.options).scan_ids == ["s-0", "s-2"]
