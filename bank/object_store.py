"""The bank's commit protocol on object stores (S3 and the like), which lack renames and locks.

A scan write puts a complete Zarr group under a fresh prefix ``scans/<id>@<version>/``
that nothing reads yet, then one small row object ``rows/<id>@<version>.json``: that
single PUT is the commit. The live version of a scan is the newest version that has a
row (versions sort by their start time), so every reader that lists ``rows/`` agrees,
and a version's objects are never modified after it is written. ``index.json`` is a
snapshot of the rows for fast opening; readers correct it from the ``rows/`` listing
(one LIST request per 1,000 scans), so a stale snapshot costs a few GETs, never a row.
Objects no live row names are leftovers: removed once older than a grace period, so
that neither an in-progress write nor a reader of a just-replaced version loses data.
Format and guarantees: docs/bank-format.md, "Object storage".
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

from .layout import (
    INDEX_FILE,
    ROWS_DIR,
    SCANS_DIR,
    parse_versioned,
    row_key,
    scan_path,
    version_time,
)


def _grace_from_environment(default: float = 3600.0) -> float:
    try:
        return max(0.0, float(os.environ.get("MASKBANK_LEFTOVER_GRACE_S", default)))
    except ValueError:
        return default  # a typo must not make cleanup delete in-progress writes


#: Seconds an unindexed or replaced version is kept before cleanup may remove it: a writer
#: must finish a scan, and a reader finish reading the version it opened, within this time.
GRACE_S = _grace_from_environment()
#: Rows the snapshot may lag behind before a writer rewrites it (readers GET those rows).
SNAPSHOT_SLACK = 32
#: Object-store protocols a bank may be written to (they list and read after write consistently).
WRITABLE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


@dataclass
class Listing:
    """What ``rows/`` holds: the live version of each scan and the replaced rows."""

    live: dict[str, str] = field(default_factory=dict)
    superseded: list[tuple[str, str]] = field(default_factory=list)


def _ls(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Base names under a prefix, listed afresh.

    s3fs caches listings per (shared) instance: ``refresh=True`` makes this one call
    bypass the cache, where invalidating first would let another thread's listing
    slip in between.
    """
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True)]
    except FileNotFoundError:
        return []


def _names(fs: fsspec.AbstractFileSystem, folder: str, scan_id: str | None) -> list[str]:
    """Names directly under ``folder``; with ``scan_id``, at least those of that scan.

    Why: a writer needs only its scan's versions, and on S3 and GCS a listing by key
    prefix (``<scan_id>@``) costs one request however many scans the bank holds, where
    the whole folder takes one request per 1,000 scans.
    """
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if scan_id is None or not set(protocols) & {"s3", "s3a", "gs", "gcs"}:
        return _ls(fs, folder)
    base = fs._strip_protocol(folder).rstrip("/") + "/"
    keys = fs.find(folder, prefix=f"{scan_id}@")  # a fresh listing (no delimiter: no cache)
    return sorted({k[len(base) :].split("/", 1)[0] for k in keys if k.startswith(base)})


def list_rows(fs: fsspec.AbstractFileSystem, root: str, scan_id: str | None = None) -> Listing:
    """The ``rows/`` listing: newest version per scan is live, older ones are superseded.

    With ``scan_id``, only that scan's rows (one request on S3).
    """
    by_scan: dict[str, list[str]] = {}
    for name in _names(fs, f"{root}/{ROWS_DIR}", scan_id):
        parsed = parse_versioned(name) if name.endswith(".json") else None
        if parsed is not None and scan_id in (None, parsed[0]):
            by_scan.setdefault(parsed[0], []).append(parsed[1])
    out = Listing()
    for sid, versions in by_scan.items():
        versions.sort()
        out.live[sid] = versions[-1]
        out.superseded += [(sid, v) for v in versions[:-1]]
    return out


def list_scan_folders(
    fs: fsspec.AbstractFileSystem, root: str, scan_id: str | None = None
) -> list[str]:
    """Names under ``scans/``: ``<id>@<version>`` prefixes and plain ``<id>`` folders
    (with ``scan_id``: at least that scan's versions)."""
    return sorted(n for n in _names(fs, f"{root}/{SCANS_DIR}", scan_id) if n != "zarr.json")


def read_rows(
    fs: fsspec.AbstractFileSystem, root: str, wanted: Mapping[str, str]
) -> dict[str, dict]:
    """Rows of ``{scan id: version}``, fetched concurrently; a row gone meanwhile is skipped."""
    if not wanted:
        return {}
    paths = {f"{root}/{row_key(sid, v)}": sid for sid, v in wanted.items()}
    got = fs.cat(list(paths), on_error="omit")
    rows = {}
    for path, data in got.items():
        sid = paths.get(path) or paths.get(_strip_protocol(fs, path))
        if sid is None or isinstance(data, Exception):
            continue
        try:
            row = json.loads(data)
        except ValueError:
            continue  # a torn row cannot happen (one PUT), but never trust bytes blindly
        if isinstance(row, dict) and row.get("scan_id") == sid:
            rows[sid] = row
    return rows


def _strip_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs._strip_protocol(path)


def put_row(fs: fsspec.AbstractFileSystem, root: str, row: Mapping[str, Any]) -> None:
    """Commit a scan version: one PUT of its row (the row names the version)."""
    path = f"{root}/{row_key(row['scan_id'], row['version'])}"
    fs.pipe_file(path, json.dumps(dict(row), sort_keys=True).encode("utf-8"))


def merge_rows(
    fs: fsspec.AbstractFileSystem,
    root: str,
    snapshot: Mapping[str, dict],
    listing: Listing,
) -> tuple[dict[str, dict], int]:
    """(rows, how many were fetched because the snapshot lacked them).

    Snapshot rows that name a version are replaced by what ``rows/`` says (dropped when
    the scan has no row any more); rows without a version are scans copied from a local
    bank, kept unless a row object supersedes them.
    """
    rows = {
        sid: row
        for sid, row in snapshot.items()
        if row.get("version") is None and sid not in listing.live
    }
    stale = {}
    for sid, version in listing.live.items():
        row = snapshot.get(sid)
        if row is not None and row.get("version") == version:
            rows[sid] = row
        else:
            stale[sid] = version
    rows.update(read_rows(fs, root, stale))
    return rows, len(stale)


@dataclass(frozen=True)
class Leftover:
    """Objects no live row names: an unfinished write, a replaced version, a replaced row."""

    path: str  # relative to the bank root: scans/<id>@<version>, scans/<id> or rows/<...>.json
    scan_id: str
    age_s: float

    def describe(self) -> str:
        return self.path


def find_leftovers(
    fs: fsspec.AbstractFileSystem,
    root: str,
    listing: Listing,
    legacy: Iterable[str] = (),
    now: float | None = None,
    scan_id: str | None = None,
) -> list[Leftover]:
    """Every scan prefix and row object that no live row names, with its age in seconds.

    ``legacy`` are the plain ``scans/<id>`` folders the index still serves (scans copied
    from a local bank); such a folder whose scan was rewritten here is a leftover too.
    With ``scan_id``, only that scan's (``listing`` must cover it).
    """
    now = time.time() if now is None else now
    keep = set(legacy)
    found = []
    for name in list_scan_folders(fs, root, scan_id):
        parsed = parse_versioned(name)
        if parsed is None:
            if name not in keep and name in listing.live and scan_id in (None, name):
                found.append(Leftover(scan_path(name), name, float("inf")))
            continue
        sid, version = parsed
        if listing.live.get(sid) != version and scan_id in (None, sid):
            found.append(Leftover(f"{SCANS_DIR}/{name}", sid, now - version_time(version)))
    for sid, version in listing.superseded:
        if scan_id in (None, sid):
            found.append(Leftover(row_key(sid, version), sid, now - version_time(version)))
    return sorted(found, key=lambda f: f.path)


def remove(fs: fsspec.AbstractFileSystem, root: str, rel: str) -> None:
    """Delete one object or every object under a prefix (absent: nothing to do)."""
    path = f"{root}/{rel}"
    try:
        if rel.endswith(".json"):
            fs.rm_file(path)
        else:
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def copy_prefix(
    fs: fsspec.AbstractFileSystem, root: str, src: str, dst: str, skip: str | None = None
) -> None:
    """Server-side copy of every object under ``src`` to ``dst``, its ``zarr.json`` last.

    ``skip`` (a sub-folder name) is left out. The group's own ``zarr.json`` goes last so
    that a copy cut short never looks like a complete group.
    """
    base = f"{root}/{src}"
    fs.invalidate_cache(base)
    keys = [fs._strip_protocol(p) for p in fs.find(base)]
    prefix = fs._strip_protocol(base).rstrip("/") + "/"
    rels = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    if skip is not None:
        rels = [r for r in rels if r != skip and not r.startswith(f"{skip}/")]
    rels.sort(key=lambda r: r == "zarr.json")
    body = [r for r in rels if r != "zarr.json"]
    if body:
        fs.copy([f"{base}/{r}" for r in body], [f"{root}/{dst}/{r}" for r in body])
    if "zarr.json" in rels:
        fs.copy(f"{base}/zarr.json", f"{root}/{dst}/zarr.json")


def put_snapshot(fs: fsspec.AbstractFileSystem, root: str, text: str) -> None:
    """Rewrite ``index.json`` (one PUT: readers see the old snapshot or the new one)."""
    fs.pipe_file(f"{root}/{INDEX_FILE}", text.encode("utf-8"))


def storage_bytes(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Bytes stored under a prefix (0 if absent), listed afresh."""
    fs.invalidate_cache(path)
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0
