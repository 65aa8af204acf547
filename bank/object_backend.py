"""A bank on an object store (S3, GCS, Azure): the `Backend` of s3://, gs://, az:// URLs.

Object stores have neither renames nor locks, so every scan write puts a complete
version under its own prefix and commits it with one row object; the protocol's
pieces are in ``bank.object_store``. Format and guarantees: docs/bank-format.md,
"Object storage".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import zarr
from zarr.storage import FsspecStore

from . import object_store as _obj
from .backend import Backend, Fill, check_scan_token, root_attrs, scan_token_of
from .encoding import Encoding
from .errors import BankError, CorruptIndexError, NotABankError, UnknownScanError
from .index import parse_index, render_index
from .layout import (
    INDEX_FILE,
    REPORTS_DIR,
    ROWS_DIR,
    SCANS_DIR,
    new_version,
    parse_versioned,
    part_path,
)
from .store import StrictStore


def writable_url(location: str) -> bool:
    protocol = location.split("://", 1)[0].lower() if "://" in location else ""
    return protocol in _obj.WRITABLE_PROTOCOLS


def _protocols() -> str:
    return ", ".join(p + "://" for p in _obj.WRITABLE_PROTOCOLS)


class ObjectStoreBackend(Backend):
    def __init__(self, location: str, options: Mapping[str, Any]) -> None:
        inner = FsspecStore.from_url(location, storage_options=dict(options), read_only=True)
        fs, root = fsspec.core.url_to_fs(location, **options)
        super().__init__(location, StrictStore(inner, location), fs, root)
        self._options = dict(options)
        self._write_store: zarr.abc.store.Store | None = None
        self._snapshot_lag = 0  # rows the last refresh fetched because index.json lacked them

    # ------------------------------------------------------------------ open/create
    @classmethod
    def open(cls, location: str, options: Mapping[str, Any], writable: bool) -> ObjectStoreBackend:
        """Any fsspec URL to read; only object stores that list and read after write to write."""
        if writable and not writable_url(location):
            raise BankError(
                f"cannot open {location} for writing: only local paths and object stores "
                f"({_protocols()}) are writable"
            )
        return cls(location, options)

    def check_writable(self) -> None:
        """Nothing to probe: an object store's permissions show at the first write."""

    @staticmethod
    def ensure_bank(location: str, options: Mapping[str, Any], encoding: Encoding | None) -> None:
        """Make an empty bank under the prefix unless one is there.

        A reader that comes between the root zarr.json and index.json lists the (no) rows.
        """
        if not writable_url(location):
            raise BankError(
                f"cannot write to {location}: banks are written to local paths and object "
                f"stores ({_protocols()})"
            )
        fs, root = fsspec.core.url_to_fs(location, **options)
        root = root.rstrip("/")
        fs.invalidate_cache(root)
        if fs.exists(f"{root}/zarr.json"):
            return
        if _obj._ls(fs, root):
            raise NotABankError(location, "prefix holds objects but no zarr.json")
        store = FsspecStore.from_url(location, storage_options=dict(options), read_only=False)
        attrs = root_attrs((encoding or Encoding()).to_dict())
        group = zarr.open_group(store, mode="w-", zarr_format=3, attributes=attrs)
        group.create_group(SCANS_DIR)
        _obj.put_snapshot(fs, root, render_index({}))

    def _writer(self) -> zarr.abc.store.Store:
        """A writable zarr store on the object store (created on first write)."""
        if self._write_store is None:
            self._write_store = FsspecStore.from_url(
                self.location, storage_options=self._options, read_only=False
            )
        return self._write_store

    # ------------------------------------------------------------------ the index
    def refresh(self, strict: bool) -> None:
        """Rows = index.json corrected by the ``rows/`` listing (docs: "Object storage")."""
        self.index_error = None
        for _attempt in range(3):
            listing = _obj.list_rows(self.fs, self.fs_root)
            snapshot: dict[str, dict] = {}
            try:
                text = self.read_text(INDEX_FILE)
                self.index_missing = text is None
                if text is not None:
                    snapshot = parse_index(text, f"{self.location}/{INDEX_FILE}")
            except CorruptIndexError as exc:
                self.index_missing = False
                if strict:
                    raise
                self.index_error = str(exc)
                text = None
            if text is None:  # plain scan folders (a bank copied from disk) listed from storage
                snapshot = {
                    name: self.row_for(name)
                    for name in _obj.list_scan_folders(self.fs, self.fs_root)
                    if parse_versioned(name) is None
                }
            rows, lag = _obj.merge_rows(self.fs, self.fs_root, snapshot, listing)
            if set(listing.live) <= set(rows):
                break  # else a row was replaced between listing and reading it: list again
        self.rows = rows
        self._snapshot_lag = lag + (1 if self.index_missing or self.index_error else 0)

    def _put_snapshot(self) -> None:
        _obj.put_snapshot(self.fs, self.fs_root, render_index(self.rows))
        self._snapshot_lag = 0
        self.index_missing = False
        self.index_error = None

    def rebuild_index(self) -> None:
        """index.json from the live rows (versions never change, so neither do their rows);
        scans in plain folders (copied from disk) get their rows from their groups."""
        self.refresh(strict=False)
        for sid, row in list(self.rows.items()):
            if row.get("version") is None:
                self.rows[sid] = self.row_for(sid)
        self._put_snapshot()

    def scans_on_storage(self) -> list[str]:
        """The scans whose indexed version (or plain folder) exists."""
        folders = set(_obj.list_scan_folders(self.fs, self.fs_root))
        found = {name for name in folders if parse_versioned(name) is None}
        for sid, row in self.rows.items():
            if row.get("version") and f"{sid}@{row['version']}" in folders:
                found.add(sid)
        return sorted(found)

    def stored_version(self, scan_id: str) -> str | None:
        return self.rows.get(scan_id, {}).get("version")

    def read_scan_attrs(self, scan_id: str) -> dict | None:
        version = _obj.list_rows(self.fs, self.fs_root, scan_id).live.get(scan_id)
        if version is None and scan_id not in self.rows:
            return None
        return self.attrs_or_none(part_path(scan_id, None, version))

    # ------------------------------------------------------------------ writing
    def write(self, scan_id: str, part: str | None, scan_token: str | None, fill: Fill) -> None:
        """Write a new version under its own prefix, then commit it with one row PUT."""
        fs, root = self.fs, self.fs_root
        base = _obj.list_rows(fs, root, scan_id).live.get(scan_id)
        # (no live row but an indexed scan: a plain folder copied from disk, which is the base)
        if base is None and part is not None and scan_id not in self.rows:
            raise UnknownScanError(scan_id, len(self.rows), self.location)
        version = new_version()
        target = part_path(scan_id, None, version)
        current = None
        if part is not None:
            current = self._token(scan_id, base, part, scan_token)
        try:
            if part is None:
                fill(zarr.open_group(self._writer(), path=target, mode="w-", zarr_format=3), None)
            else:
                _obj.copy_prefix(fs, root, part_path(scan_id, None, base), target, skip=part)
                path = part_path(scan_id, part, version)
                fill(zarr.open_group(self._writer(), path=path, mode="w-", zarr_format=3), current)
            row = self.row_for(scan_id, version)
            if part is not None:  # the scan was rewritten meanwhile: refuse, as locally
                live = _obj.list_rows(fs, root, scan_id).live.get(scan_id)
                if live != base:
                    self._token(scan_id, live, part, current)
            _obj.put_row(fs, root, row)  # the commit: one PUT
        except BaseException:
            with contextlib.suppress(Exception):  # a crash leaves it for recover()
                _obj.remove(fs, root, target)
            raise
        self._after_commit(scan_id, version, row)

    def _token(
        self, scan_id: str, version: str | None, part: str, wanted: str | None
    ) -> str | None:
        """The token of a scan version; StaleScanError when it is not ``wanted`` (if given)."""
        current = scan_token_of(self.read_attrs(part_path(scan_id, None, version)) or {})
        check_scan_token(self.location, scan_id, part, wanted, current)
        return current

    def _after_commit(self, scan_id: str, version: str, row: dict) -> None:
        """Drop this scan's replaced rows and old leftovers; rewrite a lagging index.json."""
        fs, root = self.fs, self.fs_root
        listing = _obj.list_rows(fs, root, scan_id)
        live = listing.live.get(scan_id)
        if live is None or live < version:  # listed before our row landed: ours is live
            live = listing.live[scan_id] = version
        self.rows[scan_id] = row if live == version else self.rows.get(scan_id, row)
        if live is not None and live != version:  # a newer version of another writer won
            self.rows.update(_obj.read_rows(fs, root, {scan_id: live}))
        for sid, old in listing.superseded:
            if sid == scan_id and old < (live or version):
                _obj.remove(fs, root, _obj.row_key(sid, old))
        legacy = [s for s, r in self.rows.items() if r.get("version") is None]
        for left in _obj.find_leftovers(fs, root, listing, legacy, scan_id=scan_id):
            if left.age_s >= _obj.GRACE_S:
                _obj.remove(fs, root, left.path)
        self._snapshot_lag += 1
        if self._snapshot_lag >= _obj.SNAPSHOT_SLACK:
            self.refresh(strict=False)
            if self._snapshot_lag >= _obj.SNAPSHOT_SLACK:
                self._put_snapshot()

    def delete(self, scan_id: str) -> None:
        """Its rows go (readers stop seeing it at once); its objects become leftovers."""
        fs, root = self.fs, self.fs_root
        listing = _obj.list_rows(fs, root, scan_id)
        for sid, old in sorted(listing.superseded, reverse=True):  # older rows first, live last
            if sid == scan_id:
                _obj.remove(fs, root, _obj.row_key(sid, old))
        if scan_id in listing.live:
            _obj.remove(fs, root, _obj.row_key(scan_id, listing.live[scan_id]))
        self.refresh(strict=False)
        legacy = scan_id in self.rows and self.rows[scan_id].get("version") is None
        self.rows.pop(scan_id, None)
        self._put_snapshot()
        if legacy:  # a plain folder (copied from disk): unlisted now, so its objects can go
            _obj.remove(fs, root, part_path(scan_id, None))

    def record_attrs(self, scan_id: str, attrs: dict, scan_token: str | None) -> bool:
        return False  # a version's objects are never modified after it is written

    def recover(self, grace_s: float | None) -> list[str]:
        """Remove leftovers older than ``grace_s`` (default ``object_store.GRACE_S``) and
        replaced rows; refresh a lagging index.json."""
        grace_s = _obj.GRACE_S if grace_s is None else grace_s
        actions = []
        self.refresh(strict=False)
        for left in self.object_leftovers():
            is_row = left.path.startswith(f"{ROWS_DIR}/")
            if is_row or left.age_s >= grace_s:
                _obj.remove(self.fs, self.fs_root, left.path)
                what = "replaced row" if is_row else "objects no index row names"
                actions.append(f"{left.scan_id}: removed {left.path} ({what})")
        if self.index_missing or self.index_error or self._snapshot_lag:
            self._put_snapshot()
            actions.append(f"rewrote index.json ({len(self.rows)} scans)")
        return actions

    def object_leftovers(self) -> list[_obj.Leftover]:
        """Objects that no live row names, with their ages."""
        legacy = [sid for sid, row in self.rows.items() if row.get("version") is None]
        listing = _obj.list_rows(self.fs, self.fs_root)
        return _obj.find_leftovers(self.fs, self.fs_root, listing, legacy)

    def leftovers(self) -> list[str]:
        return [f.path for f in self.object_leftovers()]

    def leftover_problems(self) -> list[str]:
        """Leftovers past the grace period; younger ones may be a write in progress or a
        replaced version a reader still reads (docs/bank-format.md, "Object storage")."""
        return [
            f"leftover {left.path} (objects no index row names: an interrupted write or a "
            "replaced version; `maskbank verify --repair BANK` removes it)"
            for left in self.object_leftovers()
            if left.age_s >= _obj.GRACE_S and not left.path.startswith(f"{ROWS_DIR}/")
        ]

    def put_report(self, name: str, text: str) -> str:
        """One PUT: readers see the whole report or none."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        rel = f"{REPORTS_DIR}/{name}-{stamp}-{os.urandom(3).hex()}.json"
        self.fs.pipe_file(self.url(rel), text.encode("utf-8"))
        return f"{self.location.rstrip('/')}/{rel}"

    # ------------------------------------------------------------------ storage reads
    def nbytes(self, rel: str) -> int:
        return _obj.storage_bytes(self.fs, self.url(rel))

    def subfolders(self, rel: str) -> list[str]:
        self.fs.invalidate_cache(self.url(rel))
        try:
            entries = self.fs.ls(self.url(rel), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [Path(e["name"]).name for e in entries if e.get("type") == "directory"]
