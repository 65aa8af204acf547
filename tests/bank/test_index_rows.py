"""Index rows of a local bank: one row file per published scan, folded into index.json.

Publishers in real processes race each other and a compaction; a reader must see
exactly the committed scans throughout; corrupt and half-written row files are found
by verify and mended by verify --repair.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from maskbank.bank import Bank
from maskbank.bank import index_rows as rows_mod
from maskbank.bank.errors import CorruptIndexError
from maskbank.bank.index import make_row
from maskbank.bank.locks import file_lock
from maskbank.bank.publish import scan_lock_path
from tests.bank.conftest import make_arrays, make_attrs

REPO = Path(__file__).resolve().parents[2]

# Publishes rows only (no arrays): the index protocol alone, fast. Mode "publish" writes
# scans <tag>-000.. with nbytes = i; "compact" folds over and over until a stop file shows.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from maskbank.bank import Bank, index_rows
    from maskbank.bank.index import make_row
    root, tag, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    index_rows.MAX_PENDING = 3  # publishers fold often too: folds race publishes
    bank = Bank.open(root, mode="a")
    backend = bank._backend
    if mode == "compact":
        while not Path(root, "stop").exists():
            bank.compact_index()
            time.sleep(0.005)
        sys.exit(0)
    for i in range(n):
        sid = f"{tag}-{i:03d}"
        with bank.scan_lock(sid):
            backend.publish_row(sid, make_row(sid, {"dataset": tag}, None, i, 0))
        backend._compact_if_due()
    for i in range(0, n, 3):  # rewrite every third: the last row of a scan must win
        sid = f"{tag}-{i:03d}"
        with bank.scan_lock(sid):
            backend.publish_row(sid, make_row(sid, {"dataset": tag}, None, 1000 + i, 0))
        backend._compact_if_due()
    """
)


def spawn(root: Path, tag: str, n: int, mode: str = "publish") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), tag, str(n), mode],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )


def expected(tags: list[str], n: int) -> dict[str, int]:
    out = {f"{t}-{i:03d}": i for t in tags for i in range(n)}
    out.update({f"{t}-{i:03d}": 1000 + i for t in tags for i in range(0, n, 3)})
    return out


def seen(bank: Bank) -> dict[str, int]:
    bank.refresh()
    return {sid: row["nbytes"] for sid, row in bank.index_rows.items()}


def index_json_ids(root: Path) -> list[str]:
    return [r["scan_id"] for r in json.loads((root / "index.json").read_text())["scans"]]


def pending_files(root: Path) -> list[str]:
    folder = root / "index-rows"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def lazy_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers in this process never fold on their own (the bound is far away)."""
    monkeypatch.setattr(rows_mod, "pending_bound", lambda indexed: 10_000)


def publish(bank: Bank, sid: str, nbytes: int) -> None:
    with bank.scan_lock(sid):
        bank._backend.publish_row(sid, make_row(sid, {"dataset": "d"}, None, nbytes, 0))


def test_concurrent_publishers_and_a_compaction_lose_nothing(bank: Bank) -> None:
    root = Path(bank.location)
    tags, n = ["a", "b", "c"], 24
    procs = [spawn(root, t, n) for t in tags] + [spawn(root, "z", 0, "compact")]
    reader = Bank.open(root)
    before: dict[str, int] = {}
    try:
        while any(p.poll() is None for p in procs[:-1]):
            now = seen(reader)  # while rows are published and folded: nothing ever vanishes
            assert set(before) <= set(now), sorted(set(before) - set(now))
            before = now
    finally:
        (root / "stop").touch()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    assert [p.returncode for p in procs] == [0] * 4, [p.stderr.read() for p in procs]
    assert seen(reader) == expected(tags, n)
    assert bank.compact_index() >= 0
    assert pending_files(root) == []
    assert sorted(index_json_ids(root)) == sorted(expected(tags, n))
    assert seen(Bank.open(root)) == expected(tags, n)


def test_publish_writes_its_row_file_only_and_a_reader_sees_it(
    bank: Bank, lazy_folds: None
) -> None:
    root = Path(bank.location)
    index_before = (root / "index.json").read_bytes()
    for i in range(5):
        publish(bank, f"s{i}", i)
    assert (root / "index.json").read_bytes() == index_before  # never rewritten per scan
    assert pending_files(root) == [f"s{i}.json" for i in range(5)]
    reader = Bank.open(root)
    assert seen(reader) == {f"s{i}": i for i in range(5)}
    publish(bank, "s2", 99)  # a newer row of a scan replaces its file
    bank.delete_scan("s3")  # a deletion is a tombstone
    assert seen(reader) == {"s0": 0, "s1": 1, "s2": 99, "s4": 4}
    assert bank.compact_index() == 5
    assert pending_files(root) == [] and index_json_ids(root) == ["s0", "s1", "s2", "s4"]
    assert seen(reader) == {"s0": 0, "s1": 1, "s2": 99, "s4": 4}
    assert bank.compact_index() == 0  # nothing left to fold


def test_a_row_published_during_a_fold_stays(
    bank: Bank, lazy_folds: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(bank.location)
    real = rows_mod.remove_folded

    def publish_then_remove(root: Path, folded: dict) -> int:
        publish(bank, "s", 2)  # after the fold read s's row and wrote index.json
        return real(root, folded)

    monkeypatch.setattr(rows_mod, "remove_folded", publish_then_remove)
    publish(bank, "s", 1)
    assert bank.compact_index() == 1
    assert pending_files(root) == ["s.json"]  # changed since it was read: kept
    assert seen(Bank.open(root)) == {"s": 2}
    monkeypatch.setattr(rows_mod, "remove_folded", real)
    publish(bank, "t", 3)
    with file_lock(scan_lock_path(root, "t")):  # t's writer is busy: its file is left alone
        assert bank.compact_index() == 2
    assert pending_files(root) == ["t.json"]
    assert seen(Bank.open(root)) == {"s": 2, "t": 3}
    bank.compact_index()
    assert pending_files(root) == [] and index_json_ids(root) == ["s", "t"]
    assert seen(Bank.open(root)) == {"s": 2, "t": 3}


def test_writers_fold_once_the_rows_exceed_the_bound(
    bank: Bank, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(bank.location)
    monkeypatch.setattr(rows_mod, "pending_bound", lambda indexed: 4)
    for i in range(12):
        publish(bank, f"s{i:02d}", i)
        bank._backend._compact_if_due()
        assert len(pending_files(root)) <= 4
    assert len(index_json_ids(root)) >= 8
    assert seen(Bank.open(root)) == {f"s{i:02d}": i for i in range(12)}


def test_deleted_scan_disappears_before_and_after_compaction(filled: Bank) -> None:
    root = Path(filled.location)
    filled.delete_scan("ct-002")
    reader = Bank.open(root)
    assert "ct-002" not in reader and len(reader) == 2
    filled.compact_index()
    assert pending_files(root) == [] and "ct-002" not in index_json_ids(root)
    assert "ct-002" not in Bank.open(root)
    assert Bank.open(root).verify() == []


def test_corrupt_row_and_leftover_temp_are_reported_and_repaired(
    filled: Bank, lazy_folds: None
) -> None:
    from maskbank.flows.commands import verify as verify_cmd

    root = Path(filled.location)
    filled.write_scan("ct-009", make_arrays(9, (24, 24, 24)), make_attrs("ct-009"))
    good = (root / "index-rows" / "ct-009.json").read_bytes()
    (root / "index-rows" / "ct-009.json").write_bytes(good[: len(good) // 2])  # cut short
    (root / "index-rows" / ".ct-001.json.k3j2h1g0.tmp").write_text('{"scan_id": "ct-0')
    with pytest.raises(CorruptIndexError, match="index-rows/ct-009.json is corrupt"):
        Bank.open(root)
    lenient = Bank.open(root, strict_index=False)
    assert lenient.row("ct-009")["shape"] == [24, 24, 24]  # from its group, not the bad file
    problems = lenient.verify()
    assert any(p.startswith("corrupt index row index-rows/ct-009.json") for p in problems)
    assert "leftover index-rows/.ct-001.json.k3j2h1g0.tmp" in " ".join(problems)
    assert len(problems) == 2, problems
    assert filled.leftovers() == ["index-rows/.ct-001.json.k3j2h1g0.tmp"]
    assert verify_cmd.run(argparse.Namespace(bank=str(root), repair=False)) == 1
    assert verify_cmd.run(argparse.Namespace(bank=str(root), repair=True)) == 0
    assert pending_files(root) == []  # repaired and folded
    healed = Bank.open(root)
    assert healed.scan_ids == ["ct-001", "ct-002", "ct-009", "mr-001"]
    assert healed.verify() == []


def test_live_row_write_is_in_progress_not_leftover(filled: Bank) -> None:
    root = Path(filled.location)
    temp = root / "index-rows" / ".ct-001.json.abcdefgh.tmp"
    temp.parent.mkdir(exist_ok=True)
    temp.write_text("{")
    with file_lock(scan_lock_path(root, "ct-001")):
        assert Bank.open(root).verify() == [
            "write in progress: index-rows/.ct-001.json.abcdefgh.tmp "
            "(its writer holds the scan lock)"
        ]
        assert filled.recover() == [] and temp.exists()
    assert any("removed interrupted row write" in a for a in filled.recover())
    assert not temp.exists() and Bank.open(root).verify() == []


def test_bank_without_row_files_reads_as_before(filled: Bank) -> None:
    root = Path(filled.location)
    filled.compact_index()
    (root / "index-rows").rmdir()  # as a bank written before row files
    reader = Bank.open(root)
    assert reader.scan_ids == ["ct-001", "ct-002", "mr-001"] and reader.verify() == []
    filled.write_scan("ct-003", make_arrays(3, (20, 20, 20)), make_attrs("ct-003"))
    assert "ct-003" in Bank.open(root)
