"""Banks shared by a team: permissions, read-only copies, lock timeouts, scan versions, safety."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.errors import CorruptIndexError, LockTimeoutError, StaleScanError
from maskbank.bank.layout import check_array_name, check_scan_id
from maskbank.bank.locks import file_lock, probe_filesystem
from maskbank.bank.publish import scan_lock_path
from tests.bank.conftest import make_arrays, make_attrs

REPO = Path(__file__).resolve().parents[2]


def test_ids_with_a_trailing_newline_are_refused() -> None:
    for bad in ("scan\n", "a\n"):
        with pytest.raises(ValueError, match="invalid scan id"):
            check_scan_id(bad)
    with pytest.raises(ValueError, match="invalid array name"):
        check_array_name("image\n")
    assert check_scan_id("scan-1.v2") == "scan-1.v2"


def test_files_honour_the_umask_and_locks_are_group_writable(tmp_path: Path) -> None:
    old = os.umask(0o002)  # a team's shared folder
    try:
        bank = Bank.create(tmp_path / "bank")
        bank.write_scan("s1", make_arrays(1, (20, 18, 16)), make_attrs("s1"))
        report = Path(bank.write_report("prepare", {"ok": 1}))
    finally:
        os.umask(old)
    root = Path(bank.location)
    for path in (root / "index.json", report, root / "scans" / "s1" / "zarr.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path
    for lock in (root / ".locks" / "index.lock", scan_lock_path(root, "s1")):
        assert stat.S_IMODE(lock.stat().st_mode) & 0o060 == 0o060, lock


_READ_ONLY_SCRIPT = r"""
import json, os, sys
import numpy as np
from maskbank.bank import Bank
from maskbank.bank.chunk_reader import ShardedBloscReader, local_member

def use(path):
    bank = Bank.open(path)
    scan = bank.scan("ct-001")
    reader = ShardedBloscReader.of_local(*local_member(scan.group, "image"))
    crop = reader.read_chunks([(0, 0, 0)])[(0, 0, 0)]
    return {
        "verify": bank.verify(),
        "ids": bank.scan_ids,
        "sum": float(scan.read("image", np.s_[0:16, 0:16, 0:16]).astype(np.float64).sum()),
        "crop": float(crop.astype(np.float64).sum()),
        "html": len(bank._repr_html_()) > 0 and len(scan._repr_html_()) > 0,
    }

use(sys.argv[1])  # the writable original: every lazy import happens here
if os.getuid() == 0:  # root ignores file modes: read the copy as an ordinary user
    os.setgid(65534)
    os.setuid(65534)
print(json.dumps(use(sys.argv[2])))
"""


def test_read_only_copy_opens_verifies_and_reads(filled: Bank) -> None:
    root = Path(filled.location)
    (root / ".staging" / "ct-002@scan@0123abcd").mkdir()  # verify tests its writer's lock
    shared = Path(tempfile.mkdtemp(prefix="maskbank-ro-"))
    try:
        shared.chmod(0o755)
        copy = shared / "bank"
        shutil.copytree(root, copy)
        for folder, dirs, files in os.walk(copy):
            for name in dirs + files:
                p = Path(folder) / name
                p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222 | 0o444 | (0o111 * p.is_dir()))
        copy.chmod(0o555)
        out = subprocess.run(
            [sys.executable, "-c", _READ_ONLY_SCRIPT, str(root), str(copy)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for folder, dirs, _ in os.walk(shared):
            for name in dirs:
                (Path(folder) / name).chmod(0o755)
        shared.chmod(0o755)
        (shared / "bank").chmod(0o755)
        shutil.rmtree(shared)
    image = make_arrays(1)["image"]
    assert got["ids"] == filled.scan_ids
    assert got["verify"] == [
        "leftover .staging/ct-002@scan@0123abcd (an interrupted write; bank.recover() cleans it)"
    ]
    assert got["sum"] == pytest.approx(float(image[0:16, 0:16, 0:16].astype(np.float64).sum()))
    assert got["crop"] == pytest.approx(got["sum"])
    assert got["html"]


def _hold(path: str, held, release) -> None:
    with file_lock(Path(path)):
        held.set()
        release.wait(60)


def test_lock_wait_has_a_deadline_that_names_the_lock(tmp_path: Path) -> None:
    path = tmp_path / ".locks" / "scans" / "s1.lock"
    ctx = mp.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(str(path), held, release))
    other.start()
    try:
        assert held.wait(60)
        lock = file_lock(path, timeout=0.2)
        with pytest.raises(LockTimeoutError, match=r"s1\.lock.*MASKBANK_LOCK_TIMEOUT_S"):
            lock.__enter__()
        with file_lock(path, blocking=False) as free:
            assert not free
    finally:
        release.set()
        other.join(60)
    with file_lock(path, timeout=0.2) as got:  # free again once its holder let go
        assert got


def test_writer_probe_passes_here_and_leaves_nothing(tmp_path: Path) -> None:
    probe_filesystem(tmp_path / "locks")
    assert list((tmp_path / "locks").iterdir()) == []


def test_corrupt_index_is_a_bank_error_found_by_verify_and_repaired(filled: Bank) -> None:
    from maskbank.flows.commands import verify as verify_cmd

    root = Path(filled.location)
    (root / "index.json").write_text('{"format_version": 1, "scans": [{"scan_id": "ct-0')
    with pytest.raises(CorruptIndexError, match="verify --repair"):
        Bank.open(root)
    lenient = Bank.open(root, strict_index=False)
    assert lenient.scan_ids == filled.scan_ids  # listed from storage
    assert any("index.json is corrupt" in p for p in lenient.verify())
    assert verify_cmd.run(argparse.Namespace(bank=str(root), repair=False)) == 1
    assert verify_cmd.run(argparse.Namespace(bank=str(root), repair=True)) == 0
    assert Bank.open(root).index == filled.index
    (root / "index.json").write_text("not json")
    assert Bank.create(root).verify() == []  # a writer mends it on open too
    (root / "index.json").write_bytes(b'{"scans": [\xff\xfe]}')  # flipped bits: not UTF-8
    with pytest.raises(CorruptIndexError, match="not UTF-8"):
        Bank.open(root)
    assert verify_cmd.run(argparse.Namespace(bank=str(root), repair=True)) == 0
    assert Bank.open(root).index == filled.index


def test_proposals_record_and_check_their_scan_version(filled: Bank) -> None:
    made_from = filled.scan("ct-001").token
    filled.write_scan("ct-001", make_arrays(5), make_attrs("ct-001"))  # rewritten meanwhile
    props = {"members_indptr": np.arange(4)}
    with pytest.raises(StaleScanError, match="rewritten"):
        filled.write_scan("ct-001", props, {}, part="proposals", scan_token=made_from)
    assert not filled.scan("ct-001").has("proposals")
    now = filled.scan("ct-001").token
    assert now != made_from
    filled.write_scan("ct-001", props, {}, part="proposals", scan_token=now)
    assert filled.verify() == []
    # Proposals whose recorded version is not the scan's (e.g. copied in by hand) are reported.
    meta = Path(filled.location) / "scans" / "ct-001" / "proposals" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["maskbank"]["scan_token"] = made_from
    meta.write_text(json.dumps(doc))
    assert any(
        p.startswith("ct-001: proposals were made from another version") for p in filled.verify()
    )


def test_html_escapes_every_value(filled: Bank) -> None:
    attrs = {**make_attrs("x-1", dataset="<b>ds</b>"), "note": "<script>alert(1)</script>"}
    filled.write_scan("x-1", make_arrays(1, (20, 18, 16)), attrs)
    page = filled.scan("x-1")._repr_html_() + filled._repr_html_()
    assert "<script>" not in page and "<b>ds</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;ds&lt;/b&gt;" in page


def test_pickled_bank_carries_no_credentials(filled: Bank) -> None:
    options = {
        "auto_mkdir": False,
        "key": "AKIA-SECRET-KEY",
        "secret": "s3cr3t-value",
        "client_kwargs": {"token": "t0ken-value", "region_name": "eu-west-1"},
    }
    url = "file://" + str(Path(filled.location).resolve())
    remote = Bank.open(url, storage_options=options)
    blob = pickle.dumps(remote)
    for secret in (b"AKIA-SECRET-KEY", b"s3cr3t-value", b"t0ken-value"):
        assert secret not in blob
    again = pickle.loads(blob)
    assert again.scan_ids == filled.scan_ids
    assert again._storage_options == {
        "auto_mkdir": False,
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    assert isinstance(pickle.loads(pickle.dumps(again.scan("ct-001"))).shape, tuple)
