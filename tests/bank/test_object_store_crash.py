"""Crash safety on S3: a writer killed mid-scan leaves only unindexed objects.

Readers never see them, verify stays clean while they may still be an in-progress
write (younger than the grace period), and `recover` / the next writer of the scan
removes them (docs/bank-format.md, "Object storage").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from maskbank.bank import Bank
from maskbank.bank import object_store as obj
from maskbank.bank.layout import parse_versioned
from tests.bank.conftest import SMALL, make_arrays, make_attrs
from tests.conftest import REPO
from tests.s3_server import S3

SHAPE = (64, 64, 48)
WRITER = """
import itertools, sys
from maskbank.bank import Bank
from tests.bank.conftest import SMALL, make_arrays, make_attrs
bank = Bank.create(sys.argv[1], encoding=SMALL)
for i in itertools.count():
    sid = f"s-{i % 2}"
    bank.write_scan(sid, make_arrays(i, (64, 64, 48)), {**make_attrs(sid), "seed": i})
    print(i, flush=True)
"""


def _versions(s3: S3) -> tuple[set[str], set[str]]:
    """(version folders under scans/, versions that have a row) of the bucket's bank."""
    fs = s3.filesystem()
    names = {}
    for sub in ("scans", "rows"):
        try:
            names[sub] = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3.bucket}/bank/{sub}")}
        except FileNotFoundError:
            names[sub] = set()
    folders = {n for n in names["scans"] if parse_versioned(n)}
    rows = {n.removesuffix(".json") for n in names["rows"]}
    return folders, rows


def test_killed_writer_leaves_a_bank_that_verifies(s3: S3) -> None:
    env = {**os.environ, "MASKBANK_STORAGE_OPTIONS": s3.options_json, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, s3.url()],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for _ in range(3):  # a few committed versions first
            assert proc.stdout.readline(), "the writer died"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            folders, rows = _versions(s3)
            if folders - rows:  # a version being written: objects, no row yet
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    folders, rows = _versions(s3)
    assert folders - rows, "the writer was not caught mid-scan"

    bank = Bank.open(s3.url(), storage_options=s3.options)
    assert bank.scan_ids == ["s-0", "s-1"]
    for sid in bank.scan_ids:  # readers see whole committed versions only
        scan = bank.scan(sid)
        want = make_arrays(scan.attrs["seed"], SHAPE)
        for name in ("image", "label"):
            np.testing.assert_array_equal(scan.read(name), want[name])
    assert bank.verify() == []  # young leftovers may be a live write: not problems
    assert bank.leftovers()

    writer = Bank.create(s3.url(), encoding=SMALL, storage_options=s3.options)
    assert writer.leftovers()  # younger than the grace period: kept
    actions = writer.recover(grace_s=0)
    assert actions and writer.leftovers() == []
    assert writer.verify() == []
    folders, rows = _versions(s3)
    assert folders == rows  # nothing left but live versions


def test_next_writer_of_a_scan_removes_its_old_leftovers(s3: S3, monkeypatch) -> None:
    bank = Bank.create(s3.url(), encoding=SMALL, storage_options=s3.options)
    for seed in range(3):
        bank.write_scan("a", make_arrays(seed, (20, 18, 16)), make_attrs("a"))
    bank.write_scan("b", make_arrays(9, (20, 18, 16)), make_attrs("b"))
    old = [p for p in bank.leftovers() if "/a@" in p]
    assert len(old) == 2  # the replaced versions, kept for readers within the grace period
    monkeypatch.setattr(obj, "GRACE_S", 0.0)
    assert any("leftover" in p for p in bank.verify())  # past the grace period: a finding
    bank.write_scan("a", make_arrays(5, (20, 18, 16)), make_attrs("a"))
    left = bank.leftovers()
    assert not set(old) & set(left) and all("/a@" in p for p in left)  # only the last replaced
    np.testing.assert_array_equal(
        bank.scan("a").read("image"), make_arrays(5, (20, 18, 16))["image"]
    )
