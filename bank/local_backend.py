"""A bank in a folder on a local or shared file system (the `Backend` of plain paths).

A scan (part) is written into ``.staging/`` and renamed into place under its scan
lock (``bank.publish``); its row then replaces the old one in index.json under the
index lock, so that concurrent writers of different scans never lose each other's
rows. Format and guarantees: docs/bank-format.md ("Writing", "Shared banks").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import zarr
from zarr.storage import LocalStore

from . import publish as _publish
from .backend import Backend, Fill, check_scan_token, root_attrs, scan_token_of
from .encoding import Encoding
from .errors import (
    CorruptIndexError,
    NotABankError,
    ReadOnlyBankError,
    UnknownScanError,
)
from .index import atomic_write_text, dir_nbytes, parse_index, render_index, update_index_text
from .layout import (
    INDEX_FILE,
    LOCKS_DIR,
    REPORTS_DIR,
    SCANS_DIR,
    STAGING_DIR,
    TRASH_DIR,
    part_path,
)
from .locks import file_lock, probe_filesystem
from .store import StrictStore


class LocalBackend(Backend):
    def __init__(self, location: str, root: Path) -> None:
        store = StrictStore(LocalStore(root, read_only=True), location)
        super().__init__(location, store, fsspec.filesystem("file"), str(root.resolve()))
        self.root = root

    @property
    def local_root(self) -> Path:
        return self.root

    # ------------------------------------------------------------------ open/create
    @classmethod
    def open(cls, location: str, root: Path) -> LocalBackend:
        if not root.exists():
            raise NotABankError(location, "path does not exist")
        return cls(location, root)

    def check_writable(self) -> None:
        """Refuse a file system without working locks and atomic renames, or one we may not write."""
        try:
            probe_filesystem(self.root / LOCKS_DIR)
        except PermissionError as exc:
            raise ReadOnlyBankError(
                f"cannot write to bank {self.location} ({exc}); ask its owner for group write "
                "access (docs/bank-format.md, 'Shared banks'), or read it with Bank.open(path)"
            ) from None

    @staticmethod
    def ensure_bank(root: Path, encoding: Encoding | None) -> None:
        """Make an empty bank at ``root`` unless one is there (a concurrent creator's counts)."""
        if (root / "zarr.json").exists():
            return
        if root.exists() and any(root.iterdir()):
            if (root / "zarr.json").exists():  # a concurrent creator's rename landed meanwhile
                return
            raise NotABankError(str(root), "folder exists, is not empty and has no zarr.json")
        encoding = encoding or Encoding()
        # Build the empty bank next to its destination and rename it into place, so that
        # concurrent creators cannot interleave: exactly one rename wins, the others open it.
        root.parent.mkdir(parents=True, exist_ok=True)
        building = root.parent / f".{root.name}.creating-{os.urandom(8).hex()}"
        try:
            _build_empty_bank(building, encoding)
            try:
                os.rename(building, root)  # replaces root only if it is an empty folder
            except OSError:
                if not (root / "zarr.json").exists():
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)

    # ------------------------------------------------------------------ the index
    def refresh(self, strict: bool) -> None:
        self.index_error = None
        try:
            text = self.read_text(INDEX_FILE)
            if text is None:
                self.index_missing = True
                self.rows = {sid: self.row_for(sid) for sid in self.scans_on_storage()}
                return
            self.index_missing = False
            self.rows = parse_index(text, f"{self.location}/{INDEX_FILE}")
        except CorruptIndexError as exc:
            self.index_missing = False
            if strict:
                raise
            self.index_error = str(exc)
            self.rows = {sid: self.row_for(sid) for sid in self.scans_on_storage()}

    def publish_row(self, scan_id: str, row: dict | None) -> None:
        """Replace one row of index.json under the index lock (safe with concurrent writers).

        Only this row of the in-memory index is updated; `refresh()` picks up other writers'.
        """
        with file_lock(_publish.index_lock_path(self.root)):
            try:
                text = self.read_text(INDEX_FILE)
                if text is not None:
                    new_text = update_index_text(text, scan_id, row)
            except CorruptIndexError:
                text = None  # rebuilt below from the scans themselves
            if text is None:
                rows = {sid: self.row_for(sid) for sid in self.scans_on_storage()}
                new_text = render_index(rows)
            atomic_write_text(self.root / INDEX_FILE, new_text)
        if text is None:
            self.rows = rows
            self.index_missing = False
            self.index_error = None
        elif row is None:
            self.rows.pop(scan_id, None)
        else:
            self.rows[scan_id] = row

    def rebuild_index(self) -> None:
        with file_lock(_publish.index_lock_path(self.root)):
            rows = {sid: self.row_for(sid) for sid in self.scans_on_storage()}
            atomic_write_text(self.root / INDEX_FILE, render_index(rows))
        self.rows = rows
        self.index_missing = False
        self.index_error = None

    def scans_on_storage(self) -> list[str]:
        try:
            entries = self.fs.ls(self.url(SCANS_DIR), detail=True)
        except FileNotFoundError:
            return []
        return sorted(Path(e["name"]).name for e in entries if e.get("type") == "directory")

    # ------------------------------------------------------------------ writing
    def write(self, scan_id: str, part: str | None, scan_token: str | None, fill: Fill) -> None:
        with file_lock(_publish.scan_lock_path(self.root, scan_id)):
            if part is not None and not (self.root / part_path(scan_id, None)).is_dir():
                raise UnknownScanError(scan_id, len(self.scans_on_storage()), self.location)
            current = None
            if part is not None:
                current = scan_token_of(self.read_scan_attrs(scan_id) or {})
                check_scan_token(self.location, scan_id, part, scan_token, current)
            with _publish.staging_folder(self.root, scan_id, part) as staged:
                fill(zarr.open_group(LocalStore(staged), mode="w-", zarr_format=3), current)
                _publish.publish(self.root, staged, scan_id, part)
            self.publish_row(scan_id, self.row_for(scan_id))

    def delete(self, scan_id: str) -> None:
        """Rename the scan to .trash first, so that readers never see half of it."""
        with file_lock(_publish.scan_lock_path(self.root, scan_id)):
            target = self.root / part_path(scan_id, None)
            if target.exists():
                trash = self.root / TRASH_DIR / f"{scan_id}@deleted@{os.urandom(8).hex()}"
                trash.parent.mkdir(exist_ok=True)
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
            self.publish_row(scan_id, None)

    def record_attrs(self, scan_id: str, attrs: dict, scan_token: str | None) -> bool:
        """The scan group's zarr.json replaced atomically under the scan's lock."""
        with self.scan_lock(scan_id):
            path = self.root / part_path(scan_id, None) / "zarr.json"
            doc = json.loads(path.read_text(encoding="utf-8"))
            current = scan_token_of(doc.get("attributes") or {})
            check_scan_token(self.location, scan_id, "record", scan_token, current)
            doc.setdefault("attributes", {}).update(attrs)
            atomic_write_text(path, json.dumps(doc, indent=2))
            self.publish_row(scan_id, self.row_for(scan_id))
        return True

    def scan_lock(self, scan_id: str) -> contextlib.AbstractContextManager[None]:
        return file_lock(_publish.scan_lock_path(self.root, scan_id))

    def recover(self, grace_s: float | None) -> list[str]:
        actions = _publish.recover(self.root)
        on_disk = set(self.scans_on_storage())
        self.refresh(strict=False)
        if actions or self.index_missing or self.index_error or on_disk != set(self.rows):
            self.rebuild_index()
            actions.append(f"rebuilt index ({len(self.rows)} scans)")
        return actions

    def leftovers(self) -> list[str]:
        found = []
        for sub in (STAGING_DIR, TRASH_DIR):
            with contextlib.suppress(FileNotFoundError):
                found += [f"{sub}/{Path(p).name}" for p in self.fs.ls(self.url(sub), detail=False)]
        return sorted(found)

    def leftover_problems(self) -> list[str]:
        problems = []
        for name in self.leftovers():
            if _publish.writer_alive(self.root, name.split("/")[-1]):
                problems.append(f"write in progress: {name} (its writer holds the scan lock)")
            else:
                problems.append(f"leftover {name} (an interrupted write; bank.recover() cleans it)")
        return problems

    def put_report(self, name: str, text: str) -> str:
        folder = self.root / REPORTS_DIR
        folder.mkdir(exist_ok=True)
        while True:  # microsecond stamps sort by time and make collisions practically impossible
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            path = folder / f"{name}-{stamp}.json"
            if not path.exists():
                break
        atomic_write_text(path, text)
        return str(path)

    # ------------------------------------------------------------------ storage reads
    def nbytes(self, rel: str) -> int:
        return dir_nbytes(self.root / rel)

    def subfolders(self, rel: str) -> list[str]:
        try:
            return [e.name for e in os.scandir(self.root / rel) if e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []


def _build_empty_bank(root: Path, encoding: Encoding) -> None:
    """Root group with the format attributes, scans group, empty index and service folders."""
    root.mkdir()
    for sub in (SCANS_DIR, REPORTS_DIR, STAGING_DIR, TRASH_DIR, LOCKS_DIR):
        (root / sub).mkdir()
    attrs = root_attrs(encoding.to_dict())
    group = zarr.open_group(LocalStore(root), mode="w-", zarr_format=3, attributes=attrs)
    group.create_group(SCANS_DIR)
    atomic_write_text(root / INDEX_FILE, render_index({}))
