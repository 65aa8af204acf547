"""Index rows of a local bank published one file per scan, folded into index.json later.

Why: rewriting index.json for every published scan costs O(scans) per scan, O(scans²)
per bank, all under one bank-wide lock. Instead a writer commits its scan's row as
``index-rows/<scan_id>.json`` (temp file, fsync, rename, under the scan's own lock); a
deleted scan's row is a tombstone. Readers read these files first, then index.json,
and take a file's row over index.json's. Compaction (under the index lock) folds the
files into index.json, then unlinks each file that still holds what was folded,
holding that scan's lock, so a row published meanwhile is never lost.
Format and protocol: docs/bank-format.md ("index.json").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .index import ROW_KEYS, atomic_write_text, row_line
from .layout import INDEX_ROWS_DIR, check_scan_id
from .locks import file_lock
from .publish import fsync_dir, scan_lock_path

#: A writer folds the pending rows into index.json once they outnumber 1/PENDING_SHARE of
#: the indexed scans: a fold rewrites the whole index, so this keeps its amortised cost
#: per published scan to about PENDING_SHARE rows ...
PENDING_SHARE = 16
#: ... or MAX_PENDING rows, whichever is fewer, so that a reader never reads more than
#: about this many row files (plus what concurrent writers add before one folds).
MAX_PENDING = 1024
#: A writer counts the pending rows after every (bound // CHECKS_PER_BOUND)-th publish:
#: listing the folder costs O(pending rows), and counting at every publish would double
#: the cost of publishing into a large bank.
CHECKS_PER_BOUND = 64

_TOMBSTONE = "deleted"
_TEMP_SUFFIX = ".tmp"


@dataclass
class Pending:
    """What ``index-rows/`` holds, as one listing read it."""

    rows: dict[str, dict | None] = field(default_factory=dict)  # None: the scan was deleted
    raw: dict[str, bytes] = field(default_factory=dict)  # each row file's bytes as read
    corrupt: dict[str, str] = field(default_factory=dict)  # scan id -> why it is unusable
    temps: dict[str, str] = field(default_factory=dict)  # name -> scan id: writes in flight or cut
    unknown: list[str] = field(default_factory=list)  # names the bank did not make


def rows_dir(root: Path) -> Path:
    return root / INDEX_ROWS_DIR


def row_path(root: Path, scan_id: str) -> Path:
    return root / INDEX_ROWS_DIR / f"{scan_id}.json"


def row_text(scan_id: str, row: Mapping | None) -> str:
    """A row file's text: the line index.json would hold, or the scan's tombstone."""
    if row is None:
        return json.dumps({"scan_id": scan_id, _TOMBSTONE: True}) + "\n"
    return row_line(dict(row)) + "\n"


def parse_row(scan_id: str, data: bytes) -> dict | None:
    """The row a file commits (None: the scan was deleted); ValueError if it is not one."""
    try:
        row = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(row, dict) or row.get("scan_id") != scan_id:
        raise ValueError("not a row of this scan (scan_id differs from the file name)")
    if row.get(_TOMBSTONE) is True and len(row) == 2:
        return None
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"row lacks {missing}")
    return row


def write_row(root: Path, scan_id: str, row: Mapping | None) -> None:
    """Commit one scan's row (None: its tombstone); the caller holds the scan's lock.

    The temp file's name starts with "." and ends ".tmp", so neither readers nor a
    compaction ever take it for a committed row.
    """
    path = row_path(root, scan_id)
    atomic_write_text(path, row_text(scan_id, row))
    fsync_dir(path.parent)  # the rename is the commit: make it durable


def temp_scan_id(name: str) -> str | None:
    """Scan id of a row temp file ``.<scan_id>.json.<random>.tmp``; None for other names."""
    if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX)):
        return None
    head, _, _random = name[1 : -len(_TEMP_SUFFIX)].rpartition(".")
    return _scan_id_of(head)


def _scan_id_of(filename: str) -> str | None:
    if not filename.endswith(".json"):
        return None
    try:
        return check_scan_id(filename[: -len(".json")])
    except ValueError:
        return None


def read_pending(root: Path) -> Pending:
    """Every row file, read and checked; files unlinked by a compaction meanwhile are
    skipped (that compaction wrote their rows into index.json first)."""
    found = Pending()
    try:
        entries = list(os.scandir(rows_dir(root)))
    except FileNotFoundError:  # a bank written before index rows, or never published to
        return found
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            temp_of = temp_scan_id(name)
            if temp_of is not None:
                found.temps[name] = temp_of
            continue  # other hidden files are not the bank's (e.g. NFS's .nfs*)
        scan_id = _scan_id_of(name)
        if scan_id is None:
            found.unknown.append(name)
            continue
        try:
            with open(entry.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            continue
        try:
            found.rows[scan_id] = parse_row(scan_id, data)
        except ValueError as exc:
            found.corrupt[scan_id] = str(exc)
        else:
            found.raw[scan_id] = data
    found.unknown.sort()
    return found


def count_pending(root: Path) -> int:
    """Committed row files (a listing, no file read)."""
    try:
        with os.scandir(rows_dir(root)) as entries:
            return sum(1 for e in entries if not e.name.startswith("."))
    except FileNotFoundError:
        return 0


def pending_bound(indexed: int) -> int:
    """Pending rows beyond which a writer folds them (see PENDING_SHARE, MAX_PENDING)."""
    return min(MAX_PENDING, indexed // PENDING_SHARE)


def remove_folded(root: Path, folded: Mapping[str, bytes]) -> int:
    """Unlink each row file that still holds the bytes folded; return how many went.

    Each is compared and unlinked holding its scan's lock, which every row writer
    holds, so a row published after the fold read it stays. A busy lock is skipped,
    never waited for: the file stays pending, which is always correct.
    """
    removed = 0
    for scan_id, data in folded.items():
        with file_lock(scan_lock_path(root, scan_id), blocking=False) as free:
            if free and unlink_if_holds(row_path(root, scan_id), data):
                removed += 1
    return removed


def unlink_if_holds(path: Path, data: bytes) -> bool:
    """Unlink ``path`` if it holds exactly ``data`` (the caller holds its scan's lock)."""
    try:
        with open(path, "rb") as fh:
            same = fh.read() == data
    except FileNotFoundError:
        return False
    if same:
        path.unlink(missing_ok=True)
    return same
