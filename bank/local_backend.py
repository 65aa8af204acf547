"""A bank in a folder on a local or shared file system (the `Backend` of plain paths).

A scan (part) is written into ``.staging/`` and renamed into place under its scan
lock (``bank.publish``); its row is then committed as a file of its own under the
same lock (``bank.index_rows``), so publishing costs the same in a bank of 100 scans
as in one of 100,000 and writers of different scans never wait for each other.
index.json is a snapshot that compaction brings up to date (`compact_index`).
Format and guarantees: docs/bank-format.md ("index.json", "Atomic writes and crash
recovery", "Shared banks").
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

from . import index_rows as _rows
from . import publish as _publish
from .backend import Backend, Fill, check_scan_token, root_attrs, scan_token_of
from .encoding import Encoding
from .errors import (
    CorruptIndexError,
    NotABankError,
    ReadOnlyBankError,
    UnknownScanError,
)
from .index import atomic_write_text, dir_nbytes, fold_rows, parse_index, render_index
from .layout import (
    INDEX_FILE,
    INDEX_ROWS_DIR,
    LOCKS_DIR,
    REPORTS_DIR,
    SCANS_DIR,
    STAGING_DIR,
    TRASH_DIR,
    part_path,
)
from .locks import file_lock, probe_filesystem, try_lock_readonly
from .store import StrictStore


class LocalBackend(Backend):
    def __init__(self, location: str, root: Path) -> None:
        store = StrictStore(LocalStore(root, read_only=True), location)
        super().__init__(location, store, fsspec.filesystem("file"), str(root.resolve()))
        self.root = root
        self._unchecked = 0  # publishes since this process last counted the pending rows

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
        """Rows = index.json corrected by the row files, which are read first: a
        compaction writes index.json before it unlinks the files it folded."""
        self.index_error = None
        pending = _rows.read_pending(self.root)
        try:
            text = self.read_text(INDEX_FILE)
            if text is None:
                self.index_missing = True
                self.rows = self._rows_from_storage()
                return
            self.index_missing = False
            rows = parse_index(text, f"{self.location}/{INDEX_FILE}")
        except CorruptIndexError as exc:
            self.index_missing = False
            if strict:
                raise
            self.index_error = str(exc)
            self.rows = self._rows_from_storage()
            return
        if pending.corrupt and strict:
            scan_id, why = min(pending.corrupt.items())
            raise CorruptIndexError(
                f"{self.location}/{INDEX_ROWS_DIR}/{scan_id}.json is corrupt ({why}); rewrite "
                "it from its scan with `maskbank verify --repair BANK` (or bank.recover() on a "
                "writable bank)"
            )
        for scan_id, row in pending.rows.items():
            if row is None:
                rows.pop(scan_id, None)
            else:
                rows[scan_id] = row
        for scan_id in pending.corrupt:  # never used: the scan's group says (verify reports it)
            if (self.root / part_path(scan_id, None)).is_dir():
                rows[scan_id] = self.row_for(scan_id)
            else:
                rows.pop(scan_id, None)
        self.rows = rows

    def _rows_from_storage(self) -> dict[str, dict]:
        return {sid: self.row_for(sid) for sid in self.scans_on_storage()}

    def publish_row(self, scan_id: str, row: dict | None) -> None:
        """Commit one scan's row (None: deleted) as its row file; the caller holds the
        scan's lock. Takes no bank-wide lock and reads nothing: index.json is brought up
        to date later by `compact_index`. `refresh()` picks up other writers' rows."""
        _rows.write_row(self.root, scan_id, row)
        if row is None:
            self.rows.pop(scan_id, None)
        else:
            self.rows[scan_id] = row

    def _compact_if_due(self) -> None:
        """Fold the row files once they exceed `index_rows.pending_bound` (amortised: the
        folder is counted every few publishes; a fold in progress elsewhere is not waited for)."""
        bound = _rows.pending_bound(len(self.rows))
        self._unchecked += 1
        if self._unchecked < max(1, bound // _rows.CHECKS_PER_BOUND):
            return
        self._unchecked = 0
        if _rows.count_pending(self.root) > bound:
            self.compact_index(blocking=False)

    def compact_index(self, blocking: bool = True) -> int:
        """Fold the row files into index.json and unlink them; return the rows folded.

        Under the index lock, which only compactions and rebuilds take (publishers never
        wait for it); ``blocking=False`` returns 0 at once while another process holds
        it. A file that changed after it was read, or whose scan is being written, stays
        pending. A missing or corrupt index.json is rebuilt from the scans instead.
        """
        with file_lock(_publish.index_lock_path(self.root), blocking=blocking) as got:
            if not got:
                return 0
            pending = _rows.read_pending(self.root)
            if not pending.rows:
                return 0
            try:
                text = self.read_text(INDEX_FILE)
                new_text = None if text is None else fold_rows(text, pending.rows)
            except CorruptIndexError:
                new_text = None
            if new_text is None:
                if not blocking:
                    return 0
                self._rebuild_locked()
                return len(pending.rows)
            atomic_write_text(self.root / INDEX_FILE, new_text)
            _rows.remove_folded(self.root, pending.raw)
        return len(pending.rows)

    def rebuild_index(self) -> None:
        with file_lock(_publish.index_lock_path(self.root)):
            self._rebuild_locked()

    def _rebuild_locked(self) -> None:
        """index.json from the scan groups; then each row file, under its scan's lock, is
        unlinked where index.json now says the same, else rewritten from its scan."""
        pending = _rows.read_pending(self.root)
        rows = self._rows_from_storage()
        atomic_write_text(self.root / INDEX_FILE, render_index(rows))
        for scan_id in sorted({*pending.rows, *pending.corrupt}):
            with file_lock(_publish.scan_lock_path(self.root, scan_id), blocking=False) as free:
                if not free:
                    continue  # its writer commits its own row next
                fresh = self._row_on_storage(scan_id)
                if fresh == rows.get(scan_id):
                    _rows.row_path(self.root, scan_id).unlink(missing_ok=True)
                    continue
                _rows.write_row(self.root, scan_id, fresh)  # its group changed since it was read
                if fresh is None:
                    rows.pop(scan_id, None)
                else:
                    rows[scan_id] = fresh
        self.rows = rows
        self.index_missing = False
        self.index_error = None

    def _row_on_storage(self, scan_id: str) -> dict | None:
        """The row of a scan from its group; None when it has none (the caller holds its lock)."""
        return self.row_for(scan_id) if (self.root / part_path(scan_id, None)).is_dir() else None

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
        self._compact_if_due()

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
        self._compact_if_due()

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
        self._compact_if_due()
        return True

    def scan_lock(self, scan_id: str) -> contextlib.AbstractContextManager[None]:
        return file_lock(_publish.scan_lock_path(self.root, scan_id))

    def recover(self, grace_s: float | None) -> list[str]:
        """Undo interrupted writes, mend row files, rebuild an index that disagrees with the
        scans; else fold the pending rows (routine upkeep, not reported as an action)."""
        actions = _publish.recover(self.root)
        actions += self._recover_rows()
        on_disk = set(self.scans_on_storage())
        self.refresh(strict=False)
        if actions or self.index_missing or self.index_error or on_disk != set(self.rows):
            self.rebuild_index()
            actions.append(f"rebuilt index ({len(self.rows)} scans)")
        else:
            self.compact_index()
        return actions

    def _recover_rows(self) -> list[str]:
        """Remove row temps whose writer is gone and files the bank did not make; rewrite
        corrupt row files from their scans (each under its scan's lock, if free)."""
        actions = []
        pending = _rows.read_pending(self.root)
        folder = _rows.rows_dir(self.root)
        for name, scan_id in sorted(pending.temps.items()):
            with file_lock(_publish.scan_lock_path(self.root, scan_id), blocking=False) as free:
                if free:
                    (folder / name).unlink(missing_ok=True)
                    actions.append(
                        f"{scan_id}: removed interrupted row write {INDEX_ROWS_DIR}/{name}"
                    )
        for name in pending.unknown:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            actions.append(f"removed unrecognised {INDEX_ROWS_DIR}/{name}")
        for scan_id, why in sorted(pending.corrupt.items()):
            with file_lock(_publish.scan_lock_path(self.root, scan_id), blocking=False) as free:
                if free:
                    _rows.write_row(self.root, scan_id, self._row_on_storage(scan_id))
                    actions.append(f"{scan_id}: rewrote corrupt index row from its scan ({why})")
        return actions

    def leftovers(self) -> list[str]:
        found = []
        for sub in (STAGING_DIR, TRASH_DIR):
            with contextlib.suppress(FileNotFoundError):
                found += [f"{sub}/{Path(p).name}" for p in self.fs.ls(self.url(sub), detail=False)]
        found += [f"{INDEX_ROWS_DIR}/{name}" for name in _rows.read_pending(self.root).temps]
        return sorted(found)

    def leftover_problems(self) -> list[str]:
        problems = []
        pending = _rows.read_pending(self.root)
        for name in self.leftovers():
            base = name.split("/")[-1]
            if name.startswith(f"{INDEX_ROWS_DIR}/"):
                lock = _publish.scan_lock_path(self.root, pending.temps.get(base, base))
                alive = try_lock_readonly(lock) is False
            else:
                alive = _publish.writer_alive(self.root, base)
            if alive:
                problems.append(f"write in progress: {name} (its writer holds the scan lock)")
            else:
                problems.append(f"leftover {name} (an interrupted write; bank.recover() cleans it)")
        for scan_id, why in sorted(pending.corrupt.items()):
            problems.append(
                f"corrupt index row {INDEX_ROWS_DIR}/{scan_id}.json ({why}); never used: "
                "`maskbank verify --repair BANK` rewrites it from the scan"
            )
        for name in pending.unknown:
            problems.append(
                f"unrecognised file {INDEX_ROWS_DIR}/{name} (not an index row; `maskbank "
                "verify --repair BANK` removes it)"
            )
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
