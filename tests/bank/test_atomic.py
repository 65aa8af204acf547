"""Crash safety: real writer processes killed mid-write, then open / verify / recover.

Each crash is a real `os._exit` inside a child process at a chosen step of
`write_scan`, so no cleanup code runs, exactly as with a killed worker.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.locks import file_lock
from maskbank.bank.publish import scan_lock_path
from tests.bank.conftest import make_arrays

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import os, sys
import numpy as np
import maskbank.bank.groups as bg
import maskbank.bank.publish as bp
from maskbank.bank import Bank
from maskbank.bank.local_backend import LocalBackend
from tests.bank.conftest import make_arrays, make_attrs

root, scan_id, seed, crash_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
calls = {"rename": 0, "array": 0}
real_rename, real_write = os.rename, bg.write_array

def rename(src, dst):
    calls["rename"] += 1
    if crash_at == f"rename{calls['rename']}":
        os._exit(17)
    real_rename(src, dst)

def write_array(*args, **kwargs):
    calls["array"] += 1
    if crash_at == "array2" and calls["array"] == 2:
        os._exit(17)
    return real_write(*args, **kwargs)

def publish_row(self, *args, **kwargs):
    os._exit(17)

bp.os.rename = rename
bg.write_array = write_array
if crash_at == "index":
    LocalBackend.publish_row = publish_row
if len(sys.argv) > 5:  # a proposals part: CSR of `seed` proposals
    Bank.create(root).write_scan(
        scan_id, {"members_indptr": np.arange(seed + 1)}, {}, part=sys.argv[5]
    )
else:
    Bank.create(root).write_scan(scan_id, make_arrays(seed), make_attrs(scan_id))
"""


def crash_writer(root: str, scan_id: str, seed: int, crash_at: str, *part: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, root, scan_id, str(seed), crash_at, *part],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 17, proc.stderr


def test_crash_between_renames_keeps_old_scan_recoverable(filled: Bank) -> None:
    root = Path(filled.location)
    old = filled.scan("ct-001").read("image")
    crash_writer(str(root), "ct-001", 99, "rename2")  # old moved to trash, new not yet in place
    assert not (root / "scans" / "ct-001").exists()
    assert len(list((root / ".trash").iterdir())) == 1
    assert len(list((root / ".staging").iterdir())) == 1
    reader = Bank.open(root)
    assert "ct-001" in reader  # index still lists it ...
    problems = reader.verify()  # ... and verify says what is wrong
    assert any("ct-001: listed in index.json but its group is missing" in p for p in problems)
    assert sum("leftover" in p for p in problems) == 2
    actions = Bank.open(root, mode="a").recover()
    assert any("restored scan" in a for a in actions), actions
    healed = Bank.open(root)
    np.testing.assert_array_equal(healed.scan("ct-001").read("image"), old)
    assert healed.verify() == []


def test_create_recovers_automatically(filled: Bank) -> None:
    root = Path(filled.location)
    old = filled.scan("ct-002").read("label")
    crash_writer(str(root), "ct-002", 5, "rename2")
    again = Bank.create(root)
    np.testing.assert_array_equal(again.scan("ct-002").read("label"), old)
    assert again.verify() == []


def test_crash_while_writing_arrays_is_invisible(filled: Bank) -> None:
    root = Path(filled.location)
    crash_writer(str(root), "ct-new", 8, "array2")
    reader = Bank.open(root)
    assert "ct-new" not in reader and len(reader) == 3
    assert not (root / "scans" / "ct-new").exists()
    problems = reader.verify()
    assert len(problems) == 1 and "leftover .staging/ct-new@scan@" in problems[0]
    actions = Bank.open(root, mode="a").recover()
    assert any("removed unfinished write" in a for a in actions)
    assert Bank.open(root).verify() == []


def test_crash_before_index_update_is_repaired(filled: Bank) -> None:
    root = Path(filled.location)
    crash_writer(str(root), "ct-late", 9, "index")
    reader = Bank.open(root)
    assert "ct-late" not in reader
    assert any(
        "ct-late: group exists but index.json does not list it" in p for p in reader.verify()
    )
    writer = Bank.open(root, mode="a")
    assert "rebuilt index (4 scans)" in writer.recover()
    np.testing.assert_array_equal(
        Bank.open(root).scan("ct-late").read("image"), make_arrays(9)["image"]
    )


def test_recover_leaves_live_writers_alone(filled: Bank) -> None:
    root = Path(filled.location)
    live = root / ".staging" / "ct-001@scan@feedbeef"
    live.mkdir()
    with file_lock(scan_lock_path(root, "ct-001")):  # as a running writer holds it
        assert filled.recover() == []
        assert live.exists()
    assert any("removed unfinished write" in a for a in filled.recover())
    assert not live.exists()


def test_index_rebuild_from_groups(filled: Bank) -> None:
    root = Path(filled.location)
    before = filled.index
    (root / "index.json").unlink()
    reader = Bank.open(root)
    assert reader.scan_ids == filled.scan_ids  # falls back to listing, read-only
    assert any("index.json is missing (run bank.rebuild_index()" in p for p in reader.verify())
    rows = Bank.open(root, mode="a").rebuild_index()
    assert rows == before
    assert Bank.open(root).verify() == []


@pytest.mark.parametrize("n_writers", [2])
def test_concurrent_writers_keep_every_index_row(bank: Bank, n_writers: int) -> None:
    script = textwrap.dedent(
        """
        import sys
        from maskbank.bank import Bank
        from tests.bank.conftest import make_arrays, make_attrs
        b = Bank.create(sys.argv[1])
        for i in range(4):
            sid = f"w{sys.argv[2]}-{i}"
            b.write_scan(sid, make_arrays(i, shape=(24, 24, 24)), make_attrs(sid))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, bank.location, str(w)], cwd=REPO)
        for w in range(n_writers)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * n_writers
    reader = Bank.open(bank.location)
    assert len(reader) == 4 * n_writers
    assert reader.verify() == []


def test_verify_tells_live_writes_from_stale_ones(filled: Bank) -> None:
    root = Path(filled.location)
    (root / ".staging" / "ct-001@scan@aaaa").mkdir()
    (root / ".staging" / "ct-002@scan@bbbb").mkdir()
    with file_lock(scan_lock_path(root, "ct-001")):
        problems = filled.verify()
    assert (
        "write in progress: .staging/ct-001@scan@aaaa (its writer holds the scan lock)" in problems
    )
    assert any(p.startswith("leftover .staging/ct-002@scan@bbbb") for p in problems)


def test_concurrent_create_yields_one_bank(tmp_path: Path) -> None:
    script = (
        "import sys; from maskbank.bank import Bank; print(Bank.create(sys.argv[1]).created_at)"
    )
    target = tmp_path / "new-bank"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert len(set(outs)) == 1  # all three opened the same bank
    assert [p.name for p in tmp_path.iterdir()] == ["new-bank"]  # no build folders left


def test_crash_while_replacing_proposals_restores_the_old_ones(filled: Bank) -> None:
    root = Path(filled.location)
    filled.write_scan("ct-001", {"members_indptr": np.arange(6)}, {}, part="proposals")
    crash_writer(str(root), "ct-001", 9, "rename2", "proposals")
    assert (root / "scans" / "ct-001").is_dir()
    assert not (root / "scans" / "ct-001" / "proposals").exists()
    assert not Bank.open(root).scan("ct-001").has("proposals")  # readers: image still fine
    actions = Bank.open(root, mode="a").recover()
    assert any("restored proposals" in a for a in actions), actions
    healed = Bank.open(root)
    assert healed.row("ct-001")["n_proposals"] == 5
    assert healed.verify() == []
