"""The mask bank: a Zarr v3 store of prepared scans, their masks and proposals.

This module (with its siblings in `bank/`) is the only code that knows the
on-disk layout; everything else goes through `Bank` and `ScanView`.
Format: docs/bank-format.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from . import object_store as _obj
from . import publish as _publish
from . import storage_options as _opts
from .encoding import Encoding, write_array
from .errors import (
    BankError,
    CorruptIndexError,
    NotABankError,
    ReadOnlyBankError,
    StaleScanError,
    UnknownScanError,
    UnsupportedFormatError,
)
from .index import (
    atomic_write_text,
    dir_nbytes,
    make_row,
    parse_index,
    render_index,
    update_index_text,
    utc_now,
)
from .jsonable import to_jsonable
from .layout import (
    DEFAULT_SET,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    LOCKS_DIR,
    PROPOSALS_PART,
    REPORTS_DIR,
    ROWS_DIR,
    SCANS_DIR,
    STAGING_DIR,
    TRASH_DIR,
    check_array_name,
    check_scan_id,
    is_part,
    new_version,
    parse_versioned,
    part_path,
    set_of_part,
)
from .locks import file_lock, probe_filesystem
from .scan import ScanView
from .store import StrictStore

_without_secrets = _opts.without_secrets


def _local_path(location: str | os.PathLike) -> Path | None:
    """Local filesystem path for plain paths and file:// URLs; None for other URLs."""
    text = os.fspath(location)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if "://" in text:
        return None
    return Path(text)


def resolve_location(location: str | os.PathLike) -> str:
    """A bank location as other processes should get it: local paths absolute, URLs as given."""
    text = os.fspath(location)
    local = _local_path(text)
    return text if local is None else str(local.expanduser().resolve())


def _writable_url(location: str) -> bool:
    protocol = location.split("://", 1)[0].lower() if "://" in location else ""
    return protocol in _obj.WRITABLE_PROTOCOLS


class Bank:
    """A bank of prepared scans. Use `Bank.create` to write, `Bank.open` to read."""

    def __init__(
        self,
        location: str,
        store: zarr.abc.store.Store,
        fs: fsspec.AbstractFileSystem,
        fs_root: str,
        root_attrs: dict,
        local_root: Path | None,
        writable: bool,
    ) -> None:
        self.location = location
        self._storage_options: dict[str, Any] = {}
        self._store = store
        self._fs = fs
        self._fs_root = fs_root.rstrip("/")
        self._local = local_root
        self.writable = writable
        info = root_attrs[FORMAT_NAME]
        self.format_version: int = int(info["format_version"])
        self.encoding = Encoding.from_dict(info.get("encoding", {}))
        self.created_at: str | None = info.get("created_at")
        self._rows: dict[str, dict] = {}
        self._index_missing = False
        self._index_error: str | None = None
        self._strict_index = True
        self._object = local_root is None  # an object store: versioned scans, rows/ commits
        self._options_from_env = False
        self._write_store: zarr.abc.store.Store | None = None
        self._snapshot_lag = 0  # rows the last refresh fetched because index.json lacked them

    # ------------------------------------------------------------------ open/create
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        encoding: Encoding | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Bank:
        """Create a bank, or open an existing one for writing (and recover it).

        ``path`` is a local path or an object-store URL (s3://bucket/bank; gs://, az://);
        ``storage_options`` as for `open` (None: ``MASKBANK_STORAGE_OPTIONS``).
        """
        root = _local_path(path)
        if root is None:
            return cls._create_object(os.fspath(path), encoding, storage_options)
        if (root / "zarr.json").exists():
            return cls._reopen_for_writing(root, encoding)
        if root.exists() and any(root.iterdir()):
            if (root / "zarr.json").exists():  # a concurrent creator's rename landed meanwhile
                return cls.create(root, encoding)
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
        return cls.create(root, encoding)

    @classmethod
    def _reopen_for_writing(
        cls,
        location: str | os.PathLike,
        encoding: Encoding | None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Bank:
        """An existing bank opened for writing and recovered (recover() mends the index)."""
        bank = cls.open(location, mode="a", storage_options=storage_options, strict_index=False)
        if encoding is not None and encoding != bank.encoding:
            raise BankError(
                f"bank {location} already exists with encoding {bank.encoding}; "
                f"cannot reopen it with {encoding}"
            )
        bank.recover()
        bank._strict_index = True
        return bank

    @classmethod
    def open(
        cls,
        path_or_url: str | os.PathLike,
        mode: str = "r",
        storage_options: Mapping[str, Any] | None = None,
        *,
        strict_index: bool = True,
    ) -> Bank:
        """Open a bank: local path or any fsspec URL (s3://, gs://, file://, memory://) to read.

        mode="a" opens a bank for writing (prefer `Bank.create`, which also recovers): a
        local one (after checking that its file system has working locks and atomic
        renames) or one on an object store (s3://, gs://, az://; docs/bank-format.md,
        "Object storage"). storage_options go to fsspec (e.g. an S3 endpoint); None reads
        them from ``MASKBANK_STORAGE_OPTIONS`` (JSON). Credentials come the standard way
        (AWS_* variables, profiles) and are never pickled with the bank.
        strict_index=False opens a bank whose index.json is corrupt (scans are then listed
        from storage; `verify()` reports it), for repairs.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        location = os.fspath(path_or_url)
        local = _local_path(location)
        if mode == "a" and local is None and not _writable_url(location):
            raise BankError(
                f"cannot open {location} for writing: only local paths and object stores "
                f"({', '.join(p + '://' for p in _obj.WRITABLE_PROTOCOLS)}) are writable"
            )
        options, from_env = _opts.resolve(storage_options)
        if local is not None:
            if not local.exists():
                raise NotABankError(location, "path does not exist")
            store = StrictStore(LocalStore(local, read_only=True), location)
            fs, fs_root = fsspec.filesystem("file"), str(local.resolve())
        else:
            inner = FsspecStore.from_url(location, storage_options=options, read_only=True)
            store = StrictStore(inner, location)
            fs, fs_root = fsspec.core.url_to_fs(location, **options)
        try:
            root = zarr.open_group(store, mode="r", zarr_format=3)
            attrs = dict(root.attrs)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise NotABankError(location, f"no Zarr v3 group at its root: {exc}") from None
        info = attrs.get(FORMAT_NAME)
        if not isinstance(info, dict) or "format_version" not in info:
            raise NotABankError(location, f"root group has no '{FORMAT_NAME}' attributes")
        if int(info["format_version"]) > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{location} has bank format {info['format_version']}, this maskbank reads up to "
                f"{FORMAT_VERSION}; upgrade maskbank"
            )
        if mode == "a" and local is not None:
            try:
                probe_filesystem(local / LOCKS_DIR)  # type: ignore[operator]
            except PermissionError as exc:
                raise ReadOnlyBankError(
                    f"cannot write to bank {location} ({exc}); ask its owner for group write "
                    "access (docs/bank-format.md, 'Shared banks'), or read it with Bank.open(path)"
                ) from None
        bank = cls(location, store, fs, fs_root, attrs, local, writable=(mode == "a"))
        bank._storage_options = options
        bank._options_from_env = from_env
        bank._strict_index = strict_index
        bank.refresh()
        return bank

    # ------------------------------------------------------------------ index
    def refresh(self, strict: bool | None = None) -> None:
        """Re-read the index (other processes may have written scans since).

        A corrupt index.json raises CorruptIndexError, unless the bank was opened with
        strict_index=False (or ``strict=False`` is given for this call): then the scans
        are listed from storage, ``index_error`` says why and verify() reports it.
        """
        strict = self._strict_index if strict is None else strict
        self._index_error = None
        if self._object:
            self._refresh_object(strict)
            return
        try:
            text = self._read_text(INDEX_FILE)
            if text is None:
                self._index_missing = True
                self._rows = {sid: self._row_for(sid) for sid in self.scan_ids_on_storage()}
                return
            self._index_missing = False
            self._rows = parse_index(text, f"{self.location}/{INDEX_FILE}")
        except CorruptIndexError as exc:
            self._index_missing = False
            if strict:
                raise
            self._index_error = str(exc)
            self._rows = {sid: self._row_for(sid) for sid in self.scan_ids_on_storage()}

    @property
    def index_missing(self) -> bool:
        """True when the last refresh found no index.json (the scans were listed from storage)."""
        return self._index_missing

    @property
    def index_error(self) -> str | None:
        """Why index.json could not be read at the last (non-strict) refresh, else None."""
        return self._index_error

    @property
    def index_rows(self) -> Mapping[str, Mapping[str, Any]]:
        """Scan id -> index row, as a read-only view without copies (``index`` copies every row).

        For bank-wide passes that must stay fast at 10,000 scans (summary, tables); the rows
        are the bank's own: read them, never modify them.
        """
        return MappingProxyType(self._rows)

    @property
    def scan_ids(self) -> list[str]:
        return sorted(self._rows)

    @property
    def index(self) -> list[dict]:
        """One row per scan (see docs/bank-format.md for the columns)."""
        return [dict(self._rows[k]) for k in sorted(self._rows)]

    def row(self, scan_id: str) -> dict:
        self._require(scan_id)
        return dict(self._rows[scan_id])

    @property
    def scans(self) -> Any:
        """A pandas DataFrame, one row a scan, from the index alone (no scan is opened).

        Columns: ``bank.tables.SCAN_COLUMNS`` (id, dataset, modality, shape, spacing,
        volume, label, proposals, bytes, normalisation, source); ``n_proposals`` counts
        the default set, ``proposal_sets`` every set by name (``{"default": 40, "slic": 300}``).
        """
        from .tables import scan_table

        return scan_table(self.index)

    def proposals(self, scan_id: str, name: str = DEFAULT_SET) -> Any:
        """A pandas DataFrame, one row a proposal of ``scan_id``'s set ``name`` (no mask read).

        Columns: source, level, layer, voxels, volume_ml, bounding box, centroid and every
        feature column stored; raises ``NoProposalsError`` when the scan lacks that set.
        """
        return self.scan(scan_id).proposal_table(name)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, scan_id: object) -> bool:
        return scan_id in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.scan_ids)

    def __reduce__(self):
        """Pickle as 'reopen at the same location' (Dask tasks, DataLoader workers).

        Credentials in the storage options (keys naming a key, secret, token, password,
        credential or session) are left out: pickles travel to other machines and into
        logs. The unpickled bank gets them from the environment there, as fsspec does
        by default (e.g. AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS).
        """
        mode = "a" if self.writable else "r"
        options = None if self._options_from_env else _without_secrets(self._storage_options)
        return (_reopen, (self.location, mode, options))

    def __repr__(self) -> str:
        return f"Bank({self.location!r}, scans={len(self)}, format_version={self.format_version})"

    def _require(self, scan_id: str) -> None:
        if scan_id not in self._rows:
            raise UnknownScanError(scan_id, len(self._rows), self.location)

    def rebuild_index(self) -> list[dict]:
        """Rewrite index.json from the scan groups themselves (after crashes or manual edits)."""
        self._require_writable()
        if self._object:
            return self._rebuild_object_index()
        with file_lock(_publish.index_lock_path(self._local)):  # type: ignore[arg-type]
            rows = {sid: self._row_for(sid) for sid in self.scan_ids_on_storage()}
            atomic_write_text(self._local / INDEX_FILE, render_index(rows))  # type: ignore[operator]
        self._rows = rows
        self._index_missing = False
        self._index_error = None
        return self.index

    def _update_index(self, scan_id: str, remove: bool = False) -> None:
        """Replace one row under the index lock (safe with concurrent writers).

        Only this row of the in-memory index is updated; `refresh()` picks up other writers'.
        """
        root = self._local
        assert root is not None
        row = None if remove else self._row_for(scan_id)
        with file_lock(_publish.index_lock_path(root)):
            try:
                text = self._read_text(INDEX_FILE)
                if text is not None:
                    new_text = update_index_text(text, scan_id, row)
            except CorruptIndexError:
                text = None  # rebuilt below from the scans themselves
            if text is None:
                rows = {sid: self._row_for(sid) for sid in self.scan_ids_on_storage()}
                new_text = render_index(rows)
            atomic_write_text(root / INDEX_FILE, new_text)
        if text is None:
            self._rows = rows
            self._index_missing = False
            self._index_error = None
        elif row is None:
            self._rows.pop(scan_id, None)
        else:
            self._rows[scan_id] = row

    def _row_for(self, scan_id: str, version: str | None = None) -> dict:
        """The index row of a scan from its group (of ``version``, on object stores)."""
        attrs = self._read_attrs(part_path(scan_id, None, version)) or {}
        sets = self._proposal_sets_at(scan_id, version)
        default_attrs, default_bytes = sets.get(DEFAULT_SET, (None, 0))
        nbytes = self._nbytes_at(part_path(scan_id, None, version))
        row = make_row(scan_id, attrs, default_attrs, nbytes, default_bytes, sets)
        if version is not None:
            row["version"] = version
        return row

    def proposal_set_parts(self, scan_id: str, version: str | None = None) -> list[str]:
        """Proposal set parts stored in a scan's group (of ``version`` on object stores)."""
        rel = part_path(scan_id, None, version)
        try:
            if self._local is not None:
                names = [e.name for e in os.scandir(self._local / rel) if e.is_dir()]
            else:
                self._fs.invalidate_cache(self._url(rel))
                entries = self._fs.ls(self._url(rel), detail=True)
                names = [Path(e["name"]).name for e in entries if e.get("type") == "directory"]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if set_of_part(n) is not None)

    def _proposal_sets_at(
        self, scan_id: str, version: str | None = None
    ) -> dict[str, tuple[dict, int]]:
        """Set name -> (part attributes, bytes stored) of every complete proposal set."""
        sets = {}
        for part in self.proposal_set_parts(scan_id, version):
            attrs = self._read_attrs(part_path(scan_id, part, version))
            if attrs is not None:
                nbytes = self._nbytes_at(part_path(scan_id, part, version))
                sets[set_of_part(part)] = (attrs, nbytes)
        return sets

    def _nbytes_at(self, rel: str) -> int:
        if self._local is not None:
            return dir_nbytes(self._local / rel)
        return _obj.storage_bytes(self._fs, self._url(rel))

    def version_of(self, scan_id: str) -> str | None:
        """The indexed version of a scan on an object store (None on local banks)."""
        self._require(scan_id)
        return self._rows[scan_id].get("version")

    # ------------------------------------------------------------------ reading
    def scan(self, scan_id: str) -> ScanView:
        """A read-only view of one scan (one zarr.json read)."""
        self._require(scan_id)
        path = part_path(scan_id, None, self._rows[scan_id].get("version"))
        try:
            group = zarr.open_group(self._store, path=path, mode="r")
        except (FileNotFoundError, KeyError) as exc:
            raise BankError(
                f"scan {scan_id!r} is in the index of {self.location} but its group is missing "
                f"({exc}); run `bank.recover()` / `bank.rebuild_index()` on the writer side"
            ) from None
        return ScanView(self, scan_id, group)

    def __getitem__(self, scan_id: str) -> ScanView:
        return self.scan(scan_id)

    @property
    def store(self) -> zarr.abc.store.Store:
        """The bank's zarr store, read-only (also for scans the index does not list)."""
        return self._store

    @property
    def local_root(self) -> Path | None:
        """The bank's folder on a local (or mounted) file system; None for a remote bank."""
        return self._local

    def scan_ids_on_storage(self) -> list[str]:
        """Scan ids whose groups exist on storage: a listing, for checks and rebuilds.

        Readers use ``scan_ids`` (the index); this is what the index is checked against.
        On an object store: the scans whose indexed version (or plain folder) exists.
        """
        if self._object:
            return self._object_scans_on_storage()
        try:
            entries = self._fs.ls(self._url(SCANS_DIR), detail=True)
        except FileNotFoundError:
            return []
        return sorted(Path(e["name"]).name for e in entries if e.get("type") == "directory")

    def stored_nbytes(self, scan_id: str, part: str | None = None) -> int:
        """Bytes on storage of a scan (its proposals included) or of one part of it; 0 if absent.

        Any folder name under scans/ is measured (verify() measures what it finds), but
        never one that would climb out of it.
        """
        if (
            not isinstance(scan_id, str)
            or not scan_id
            or "/" in scan_id
            or "\\" in scan_id
            or scan_id in (".", "..")
        ):
            raise ValueError(f"invalid scan id {scan_id!r}")
        if not is_part(part):
            raise ValueError(f"unknown part {part!r}; use None, {PROPOSALS_PART!r} or a set's")
        version = self._rows.get(scan_id, {}).get("version") if self._object else None
        return self._nbytes_at(part_path(scan_id, part, version))

    def leftovers(self) -> list[str]:
        """Names under .staging/ and .trash/: writes in flight or interrupted by a crash.

        ``recover()`` (on the writer side) finishes or undoes the interrupted ones.
        On an object store: scan prefixes and rows no live row names (``object_leftovers``).
        """
        if self._object:
            return [f.path for f in self.object_leftovers()]
        found = []
        for sub in (STAGING_DIR, TRASH_DIR):
            with contextlib.suppress(FileNotFoundError):
                found += [
                    f"{sub}/{Path(p).name}" for p in self._fs.ls(self._url(sub), detail=False)
                ]
        return sorted(found)

    # ------------------------------------------------------------------ writing
    def write_scan(
        self,
        scan_id: str,
        arrays: Mapping[str, np.ndarray],
        attrs: Mapping[str, Any],
        part: str | None = None,
        scan_token: str | None = None,
    ) -> dict:
        """Write one scan (or one part of it) and publish it atomically; return its index row.

        part=None writes the scan group (needs 'image'; replaces the whole scan, proposals
        included, since they derive from the image) and gives it a new random `token`.
        part="proposals" writes/replaces only the proposals subgroup of an existing scan and
        records the scan's token in it; with `scan_token` (the token of the scan version the
        proposals were computed from, `ScanView.token`) it raises StaleScanError instead when
        the scan was rewritten meanwhile. Array names may nest with '/'.
        """
        self._require_writable()
        check_scan_id(scan_id)
        if not is_part(part):
            raise ValueError(f"unknown part {part!r}; use None, {PROPOSALS_PART!r} or a set's")
        if FORMAT_NAME in attrs:
            raise ValueError(f"attribute key {FORMAT_NAME!r} is reserved for the bank")
        arrays = {check_array_name(k): np.asarray(v) for k, v in arrays.items()}
        user_attrs = to_jsonable(dict(attrs))
        grid = self._check_arrays(scan_id, arrays, part)
        if self._object:
            return self._write_scan_object(scan_id, arrays, user_attrs, part, scan_token, grid)
        root = self._local
        assert root is not None
        with file_lock(_publish.scan_lock_path(root, scan_id)):
            if part is not None and not (root / part_path(scan_id, None)).is_dir():
                raise UnknownScanError(scan_id, len(self.scan_ids_on_storage()), self.location)
            current = None
            if part is not None:
                current = scan_token_of(self.read_scan_attrs(scan_id) or {})
                if scan_token is not None and scan_token != current:
                    raise StaleScanError(
                        f"scan {scan_id!r} of {self.location} was rewritten after its {part} "
                        f"were computed (scan version {scan_token}, now {current}); compute "
                        f"them again from the current scan (e.g. `maskbank propose BANK`)"
                    )
            with _publish.staging_folder(root, scan_id, part) as staged:
                group = zarr.open_group(LocalStore(staged), mode="w-", zarr_format=3)
                self._fill_group(group, arrays, user_attrs, part, current, grid)
                _publish.publish(root, staged, scan_id, part)
            self._update_index(scan_id)
        return self.row(scan_id)

    def _fill_group(
        self,
        group: zarr.Group,
        arrays: Mapping[str, np.ndarray],
        user_attrs: dict,
        part: str | None,
        scan_token: str | None,
        grid: tuple[int, ...],
    ) -> None:
        """Write a new scan (part) group's arrays, then its attributes (which mark it complete)."""
        encoding = self.encoding.for_part(part)
        records = {
            name: write_array(group, name, data, encoding, grid)
            for name, data in sorted(arrays.items())
        }
        info: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "written_at": utc_now(),
            "part": part or "scan",
            "arrays": records,
        }
        if part is None:
            info["token"] = os.urandom(12).hex()
        else:
            info["scan_token"] = scan_token
        if set_of_part(part) is not None:
            info["n_proposals"] = _count_proposals(arrays, user_attrs)
        # One metadata write (attrs.update writes zarr.json once per key).
        group.update_attributes({**user_attrs, FORMAT_NAME: info})

    @contextlib.contextmanager
    def scan_lock(self, scan_id: str) -> Iterator[None]:
        """Hold one scan's write lock, e.g. around a check-then-write.

        `write_scan` in the same thread re-enters it, so a caller can re-check what is
        stored (`read_scan_attrs`) and write without another writer slipping in between.
        Object stores have no locks: there it holds nothing, and concurrent writers of one
        scan resolve as docs/bank-format.md ("Object storage") says -- one version wins whole.
        """
        self._require_writable()
        check_scan_id(scan_id)
        if self._object:
            yield
            return
        with file_lock(_publish.scan_lock_path(self._local, scan_id)):  # type: ignore[arg-type]
            yield

    def read_scan_attrs(self, scan_id: str) -> dict | None:
        """A scan's attributes as stored now, bypassing the index (None if there is no scan)."""
        check_scan_id(scan_id)
        version = None
        if self._object:
            version = _obj.list_rows(self._fs, self._fs_root, scan_id).live.get(scan_id)
            if version is None and scan_id not in self._rows:
                return None
        try:
            return self._read_attrs(part_path(scan_id, None, version))
        except ValueError:  # a zarr.json cut short: treated as no usable scan
            return None

    def _check_arrays(
        self, scan_id: str, arrays: dict[str, np.ndarray], part: str | None
    ) -> tuple[int, ...]:
        if part is None:
            if "image" not in arrays:
                raise ValueError(f"scan {scan_id!r}: arrays must include 'image'")
            grid = tuple(arrays["image"].shape)
            if len(grid) != 3:
                raise ValueError(f"scan {scan_id!r}: image must be 3-D, got shape {grid}")
            image = arrays["image"]
            if image.dtype.kind == "f" and not _all_finite(image):
                raise ValueError(f"scan {scan_id!r}: image contains NaN or inf")
        else:
            if scan_id not in self._rows:
                self.refresh()
            self._require(scan_id)
            grid = tuple(self._rows[scan_id]["shape"])
        for name, data in arrays.items():
            if data.ndim == 3 and tuple(data.shape) != grid:
                raise ValueError(
                    f"scan {scan_id!r}: 3-D array {name!r} has shape {data.shape}, "
                    f"scan grid is {grid}"
                )
        return grid

    def delete_scan(self, scan_id: str) -> None:
        """Remove a scan (renamed to .trash first so readers never see half of it).

        On an object store its rows are deleted (readers stop seeing it at once) and its
        objects become leftovers, removed after the grace period.
        """
        self._require_writable()
        if self._object:
            self._delete_scan_object(scan_id)
            return
        root = self._local
        assert root is not None
        check_scan_id(scan_id)
        with file_lock(_publish.scan_lock_path(root, scan_id)):
            target = root / part_path(scan_id, None)
            if target.exists():
                trash = root / TRASH_DIR / f"{scan_id}@deleted@{os.urandom(8).hex()}"
                trash.parent.mkdir(exist_ok=True)
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
            self._update_index(scan_id, remove=True)

    def write_report(self, name: str, report: Mapping[str, Any]) -> str:
        """Store a flow report as reports/<name>-<UTC timestamp>.json; return its path.

        The timestamp looks like 20261128T043320.123456Z.
        """
        self._require_writable()
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid report name {name!r}")
        if self._object:  # one PUT: readers see the whole report or none
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            rel = f"{REPORTS_DIR}/{name}-{stamp}-{os.urandom(3).hex()}.json"
            text = json.dumps(to_jsonable(dict(report)), indent=1)
            self._fs.pipe_file(self._url(rel), text.encode("utf-8"))
            return f"{self.location.rstrip('/')}/{rel}"
        root = self._local
        assert root is not None
        folder = root / REPORTS_DIR
        folder.mkdir(exist_ok=True)
        while True:  # microsecond stamps sort by time and make collisions practically impossible
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            path = folder / f"{name}-{stamp}.json"
            if not path.exists():
                break
        atomic_write_text(path, json.dumps(to_jsonable(dict(report)), indent=1))
        return str(path)

    def reports(self, name: str | None = None) -> list[str]:
        """Report paths (oldest first), optionally only those of one flow name."""
        prefix = f"{name}-" if name else ""
        folder = f"{self._fs_root}/{REPORTS_DIR}"
        self._fs.invalidate_cache(folder)
        try:
            paths = [p for p in self._fs.ls(folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return []
        return sorted(p for p in paths if Path(p).name.startswith(prefix))

    def recover(self, grace_s: float | None = None) -> list[str]:
        """Finish or undo writes interrupted by a crash; fix the index; return actions taken.

        On an object store: remove leftovers (objects no live row names) older than
        ``grace_s`` (default ``object_store.GRACE_S``) and refresh a lagging index.json.
        """
        self._require_writable()
        if self._object:
            return self._recover_object(_obj.GRACE_S if grace_s is None else grace_s)
        root = self._local
        assert root is not None
        actions = _publish.recover(root)
        on_disk = set(self.scan_ids_on_storage())
        self.refresh(strict=False)
        if actions or self._index_missing or self._index_error or on_disk != set(self._rows):
            self.rebuild_index()
            actions.append(f"rebuilt index ({len(self._rows)} scans)")
        return actions

    # ------------------------------------------------------------------ object stores
    @classmethod
    def _create_object(
        cls, location: str, encoding: Encoding | None, storage_options: Mapping[str, Any] | None
    ) -> Bank:
        """`create` on an object store (an existing bank is opened and recovered)."""
        if not _writable_url(location):
            raise BankError(
                f"cannot write to {location}: banks are written to local paths and object "
                f"stores ({', '.join(p + '://' for p in _obj.WRITABLE_PROTOCOLS)})"
            )
        options, _ = _opts.resolve(storage_options)
        fs, root = fsspec.core.url_to_fs(location, **options)
        root = root.rstrip("/")
        fs.invalidate_cache(root)
        if not fs.exists(f"{root}/zarr.json"):
            if _obj._ls(fs, root):
                raise NotABankError(location, "prefix holds objects but no zarr.json")
            store = FsspecStore.from_url(location, storage_options=options, read_only=False)
            _build_empty_object_bank(store, fs, root, encoding or Encoding())
        return cls._reopen_for_writing(location, encoding, storage_options)

    def _writer(self) -> zarr.abc.store.Store:
        """A writable zarr store on the object store (created on first write)."""
        if self._write_store is None:
            self._write_store = FsspecStore.from_url(
                self.location, storage_options=self._storage_options, read_only=False
            )
        return self._write_store

    def scan_path(self, scan_id: str) -> str:
        """Path, relative to the bank root, of the scan group readers open (its live version)."""
        row = self._rows.get(scan_id) or {}
        return part_path(scan_id, None, row.get("version"))

    def _refresh_object(self, strict: bool) -> None:
        """Rows = index.json corrected by the ``rows/`` listing (docs: "Object storage")."""
        for _attempt in range(3):
            listing = _obj.list_rows(self._fs, self._fs_root)
            snapshot: dict[str, dict] = {}
            try:
                text = self._read_text(INDEX_FILE)
                self._index_missing = text is None
                if text is not None:
                    snapshot = parse_index(text, f"{self.location}/{INDEX_FILE}")
            except CorruptIndexError as exc:
                self._index_missing = False
                if strict:
                    raise
                self._index_error = str(exc)
                text = None
            if text is None:  # plain scan folders (a bank copied from disk) listed from storage
                snapshot = {
                    name: self._row_for(name)
                    for name in _obj.list_scan_folders(self._fs, self._fs_root)
                    if parse_versioned(name) is None
                }
            rows, lag = _obj.merge_rows(self._fs, self._fs_root, snapshot, listing)
            if set(listing.live) <= set(rows):
                break  # else a row was replaced between listing and reading it: list again
        self._rows = rows
        self._snapshot_lag = lag + (1 if self._index_missing or self._index_error else 0)

    def _object_scans_on_storage(self) -> list[str]:
        folders = set(_obj.list_scan_folders(self._fs, self._fs_root))
        found = {name for name in folders if parse_versioned(name) is None}
        for sid, row in self._rows.items():
            if row.get("version") and f"{sid}@{row['version']}" in folders:
                found.add(sid)
        return sorted(found)

    def object_leftovers(self) -> list[_obj.Leftover]:
        """Objects of an object-store bank that no live row names, with their ages."""
        if not self._object:
            return []
        legacy = [sid for sid, row in self._rows.items() if row.get("version") is None]
        listing = _obj.list_rows(self._fs, self._fs_root)
        return _obj.find_leftovers(self._fs, self._fs_root, listing, legacy)

    def _write_scan_object(
        self,
        scan_id: str,
        arrays: Mapping[str, np.ndarray],
        user_attrs: dict,
        part: str | None,
        scan_token: str | None,
        grid: tuple[int, ...],
    ) -> dict:
        """Write a new version under its own prefix, then commit it with one row PUT."""
        fs, root = self._fs, self._fs_root
        base = _obj.list_rows(fs, root, scan_id).live.get(scan_id)
        # (no live row but an indexed scan: a plain folder copied from disk, which is the base)
        if base is None and part is not None and scan_id not in self._rows:
            raise UnknownScanError(scan_id, len(self._rows), self.location)
        version = new_version()
        target = part_path(scan_id, None, version)
        current = None
        if part is not None:
            current = self._check_scan_token(scan_id, base, part, scan_token)
        try:
            if part is None:
                group = zarr.open_group(self._writer(), path=target, mode="w-", zarr_format=3)
                self._fill_group(group, arrays, user_attrs, None, None, grid)
            else:
                _obj.copy_prefix(fs, root, part_path(scan_id, None, base), target, skip=part)
                path = part_path(scan_id, part, version)
                group = zarr.open_group(self._writer(), path=path, mode="w-", zarr_format=3)
                self._fill_group(group, arrays, user_attrs, part, current, grid)
            row = self._row_for(scan_id, version)
            if part is not None:  # the scan was rewritten meanwhile: refuse, as locally
                live = _obj.list_rows(fs, root, scan_id).live.get(scan_id)
                if live != base:
                    self._check_scan_token(scan_id, live, part, current)
            _obj.put_row(fs, root, row)
        except BaseException:
            with contextlib.suppress(Exception):  # a crash leaves it for recover()
                _obj.remove(fs, root, target)
            raise
        self._after_commit(scan_id, version, row)
        return self.row(scan_id)

    def _check_scan_token(
        self, scan_id: str, version: str | None, part: str, wanted: str | None
    ) -> str | None:
        """The token of a scan version; StaleScanError when it is not ``wanted`` (if given)."""
        current = scan_token_of(self._read_attrs(part_path(scan_id, None, version)) or {})
        if wanted is not None and wanted != current:
            raise StaleScanError(
                f"scan {scan_id!r} of {self.location} was rewritten after its {part} "
                f"were computed (scan version {wanted}, now {current}); compute "
                f"them again from the current scan (e.g. `maskbank propose BANK`)"
            )
        return current

    def _after_commit(self, scan_id: str, version: str, row: dict) -> None:
        """Drop this scan's replaced rows and old leftovers; rewrite a lagging index.json."""
        fs, root = self._fs, self._fs_root
        listing = _obj.list_rows(fs, root, scan_id)
        live = listing.live.get(scan_id)
        if live is None or live < version:  # listed before our row landed: ours is live
            live = listing.live[scan_id] = version
        self._rows[scan_id] = row if live == version else self._rows.get(scan_id, row)
        if live is not None and live != version:  # a newer version of another writer won
            self._rows.update(_obj.read_rows(fs, root, {scan_id: live}))
        for sid, old in listing.superseded:
            if sid == scan_id and old < (live or version):
                _obj.remove(fs, root, _obj.row_key(sid, old))
        legacy = [s for s, r in self._rows.items() if r.get("version") is None]
        for left in _obj.find_leftovers(fs, root, listing, legacy, scan_id=scan_id):
            if left.age_s >= _obj.GRACE_S:
                _obj.remove(fs, root, left.path)
        self._snapshot_lag += 1
        if self._snapshot_lag >= _obj.SNAPSHOT_SLACK:
            self._refresh_object(strict=False)
            if self._snapshot_lag >= _obj.SNAPSHOT_SLACK:
                self._put_snapshot()

    def _put_snapshot(self) -> None:
        _obj.put_snapshot(self._fs, self._fs_root, render_index(self._rows))
        self._snapshot_lag = 0
        self._index_missing = False
        self._index_error = None

    def _delete_scan_object(self, scan_id: str) -> None:
        fs, root = self._fs, self._fs_root
        listing = _obj.list_rows(fs, root, scan_id)
        for sid, old in sorted(listing.superseded, reverse=True):  # older rows first, live last
            if sid == scan_id:
                _obj.remove(fs, root, _obj.row_key(sid, old))
        if scan_id in listing.live:
            _obj.remove(fs, root, _obj.row_key(scan_id, listing.live[scan_id]))
        self._refresh_object(strict=False)
        legacy = scan_id in self._rows and self._rows[scan_id].get("version") is None
        self._rows.pop(scan_id, None)
        self._put_snapshot()
        if legacy:  # a plain folder (copied from disk): unlisted now, so its objects can go
            _obj.remove(fs, root, part_path(scan_id, None))

    def _recover_object(self, grace_s: float) -> list[str]:
        actions = []
        self.refresh(strict=False)
        for left in self.object_leftovers():
            is_row = left.path.startswith(f"{ROWS_DIR}/")
            if is_row or left.age_s >= grace_s:
                _obj.remove(self._fs, self._fs_root, left.path)
                what = "replaced row" if is_row else "objects no index row names"
                actions.append(f"{left.scan_id}: removed {left.path} ({what})")
        if self._index_missing or self._index_error or self._snapshot_lag:
            self._put_snapshot()
            actions.append(f"rewrote index.json ({len(self._rows)} scans)")
        return actions

    def _rebuild_object_index(self) -> list[dict]:
        """index.json from the live rows (versions never change, so neither do their rows);
        scans in plain folders (copied from disk) get their rows from their groups."""
        self._refresh_object(strict=False)
        for sid, row in list(self._rows.items()):
            if row.get("version") is None:
                self._rows[sid] = self._row_for(sid)
        self._put_snapshot()
        return self.index

    # ------------------------------------------------------------------ checks
    def verify(self, scan_ids: list[str] | None = None, deep: bool = True) -> list[str]:
        """Integrity check; returns problems, empty when healthy.

        deep=True decodes every chunk and compares checksums (slow, reads everything);
        deep=False checks index, attributes, array metadata and shapes only.
        scan_ids limits the per-scan checks (the bank-level checks always run).
        """
        from .verify import verify_bank

        return verify_bank(self, scan_ids=scan_ids, deep=deep)

    def summary(self) -> dict:
        """Counts, voxels and bytes from the index (fast; no scan group is opened)."""
        from .summary import summarise

        return summarise(self)

    def _repr_html_(self) -> str:
        from .browse import bank_html

        return bank_html(self)

    # ------------------------------------------------------------------ storage helpers
    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyBankError(
                f"bank {self.location} is open read-only; use Bank.create(path) to write"
            )

    def _url(self, rel: str) -> str:
        return f"{self._fs_root}/{rel}"

    def _read_text(self, rel: str) -> str | None:
        """UTF-8 text of a bank file, None if absent; bytes that are not UTF-8 are corruption."""
        try:
            with self._fs.open(self._url(rel), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if rel == INDEX_FILE:
                raise CorruptIndexError(
                    f"{self.location}/{INDEX_FILE} is corrupt (not UTF-8: {exc.reason} at byte "
                    f"{exc.start}); rebuild it from the scans with `maskbank verify --repair BANK`"
                ) from None
            raise BankError(f"{self.location}/{rel} is corrupt (not UTF-8 text)") from None

    def _read_attrs(self, rel: str) -> dict | None:
        """Attributes of the group at rel (None if there is no group there)."""
        text = self._read_text(f"{rel}/zarr.json")
        if text is None:
            return None
        return json.loads(text).get("attributes", {})


def _build_empty_bank(root: Path, encoding: Encoding) -> None:
    """Root group with the format attributes, scans group, empty index and service folders."""
    root.mkdir()
    for sub in (SCANS_DIR, REPORTS_DIR, STAGING_DIR, TRASH_DIR, LOCKS_DIR):
        (root / sub).mkdir()
    attrs = _root_attrs(encoding)
    group = zarr.open_group(LocalStore(root), mode="w-", zarr_format=3, attributes=attrs)
    group.create_group(SCANS_DIR)
    atomic_write_text(root / INDEX_FILE, render_index({}))


def _build_empty_object_bank(
    store: zarr.abc.store.Store, fs: fsspec.AbstractFileSystem, root: str, encoding: Encoding
) -> None:
    """The empty bank on an object store, as `_build_empty_bank` makes it on disk.

    A reader that comes between the root zarr.json and index.json lists the (no) rows.
    """
    group = zarr.open_group(store, mode="w-", zarr_format=3, attributes=_root_attrs(encoding))
    group.create_group(SCANS_DIR)
    _obj.put_snapshot(fs, root, render_index({}))


def _root_attrs(encoding: Encoding) -> dict:
    return {
        FORMAT_NAME: {
            "format_version": FORMAT_VERSION,
            "created_at": utc_now(),
            "encoding": encoding.to_dict(),
            "layout": "docs/bank-format.md",
        }
    }


def _reopen(location: str, mode: str, options: Mapping[str, Any] | None) -> Bank:
    """Unpickle a bank: its credential-free options, completed from this process's environment."""
    if options is not None:
        options = _opts.merged(_opts.from_environment(), options)
    return Bank.open(location, mode, options)


def scan_token_of(attrs: Mapping[str, Any]) -> str | None:
    """The version token of a scan from its attributes (written_at for scans older than tokens)."""
    info = attrs.get(FORMAT_NAME) or {}
    token = info.get("token") or info.get("written_at")
    return None if token is None else str(token)


def _all_finite(a: np.ndarray) -> bool:
    """``np.isfinite(a).all()``; for float16 by the exponent bits (numpy's float16 path is slow)."""
    if a.dtype == np.float16:
        magnitude = np.bitwise_and(np.ascontiguousarray(a).view(np.uint16), 0x7FFF)
        return magnitude.size == 0 or int(magnitude.max()) < 0x7C00  # all-ones exponent: inf/NaN
    return bool(np.isfinite(a).all())


def _count_proposals(arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> int:
    """n_proposals from the caller's attrs, else from a CSR indptr array, else 0."""
    if "n_proposals" in attrs:
        return int(attrs["n_proposals"])
    for name, data in arrays.items():
        if name.split("/")[-1] in ("members_indptr", "indptr") and data.ndim == 1:
            return max(0, len(data) - 1)
    return 0
