"""The mask bank: a Zarr v3 store of prepared scans, their masks and proposals.

This module (with its siblings in `bank/`) is the only code that knows the
on-disk layout; everything else goes through `Bank` and `ScanView`. Where scans
are stored -- a local folder or an object store -- is the business of the bank's
backend (`bank.backend`); `Bank` validates, encodes and reads the same way on both.
Format: docs/bank-format.md.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import zarr

from . import storage_options as _opts
from .backend import Backend, scan_token_of
from .encoding import Encoding
from .errors import (
    BankError,
    NotABankError,
    ReadOnlyBankError,
    UnknownScanError,
    UnsupportedFormatError,
)
from .groups import fill_group
from .jsonable import to_jsonable
from .layout import (
    DEFAULT_SET,
    FORMAT_NAME,
    FORMAT_VERSION,
    PROPOSALS_PART,
    check_array_name,
    check_scan_id,
    is_part,
    part_path,
)
from .local_backend import LocalBackend
from .object_backend import ObjectStoreBackend
from .scan import ScanView, open_view
from .scan_opener import ScanOpener

__all__ = ["Bank", "resolve_location", "scan_token_of"]

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


def _open_backend(
    location: str, options: Mapping[str, Any], writable: bool
) -> LocalBackend | ObjectStoreBackend:
    """The backend of a location: a local folder, or any fsspec URL (object stores to write)."""
    local = _local_path(location)
    if local is not None:
        return LocalBackend.open(location, local)
    return ObjectStoreBackend.open(location, options, writable)


class Bank:
    """A bank of prepared scans. Use `Bank.create` to write, `Bank.open` to read."""

    def __init__(self, backend: Backend, root_attrs: dict, writable: bool) -> None:
        self._backend = backend
        self.location = backend.location
        self._storage_options: dict[str, Any] = {}
        self.writable = writable
        info = root_attrs[FORMAT_NAME]
        self.format_version: int = int(info["format_version"])
        self.encoding = Encoding.from_dict(info.get("encoding", {}))
        self.created_at: str | None = info.get("created_at")
        self._strict_index = True
        self._options_from_env = False

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
            options, _ = _opts.resolve(storage_options)
            ObjectStoreBackend.ensure_bank(os.fspath(path), options, encoding)
            return cls._reopen_for_writing(os.fspath(path), encoding, storage_options)
        LocalBackend.ensure_bank(root, encoding)
        return cls._reopen_for_writing(root, encoding)

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
        writable = mode == "a"
        options, from_env = _opts.resolve(storage_options)
        backend = _open_backend(location, options, writable)
        try:
            root = zarr.open_group(backend.store, mode="r", zarr_format=3)
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
        if writable:
            backend.check_writable()
        bank = cls(backend, attrs, writable=writable)
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
        self._backend.refresh(self._strict_index if strict is None else strict)

    @property
    def _rows(self) -> dict[str, dict]:
        return self._backend.rows

    @property
    def index_missing(self) -> bool:
        """True when the last refresh found no index.json (the scans were listed from storage)."""
        return self._backend.index_missing

    @property
    def index_error(self) -> str | None:
        """Why index.json could not be read at the last (non-strict) refresh, else None."""
        return self._backend.index_error

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

    def proposal_table(self, scan_id: str, name: str = DEFAULT_SET) -> Any:
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
        self._backend.rebuild_index()
        return self.index

    def compact_index(self) -> int:
        """Fold the rows published since the last compaction into index.json; return how many.

        Writers commit one small row file per scan (docs/bank-format.md, "index.json") and
        fold them once they outnumber a bound; flows fold the rest when they finish
        (`recover`), so a reader opening the bank reads index.json and few row files.
        """
        self._require_writable()
        return self._backend.compact_index()

    def proposal_set_parts(self, scan_id: str, version: str | None = None) -> list[str]:
        """Proposal set parts stored in a scan's group (of ``version`` on object stores)."""
        return self._backend.proposal_set_parts(scan_id, version)

    def version_of(self, scan_id: str) -> str | None:
        """The indexed version of a scan on an object store (None on local banks)."""
        self._require(scan_id)
        return self._rows[scan_id].get("version")

    def scan_path(self, scan_id: str) -> str:
        """Path, relative to the bank root, of the scan group readers open (its live version)."""
        row = self._rows.get(scan_id) or {}
        return part_path(scan_id, None, row.get("version"))

    # ------------------------------------------------------------------ reading
    def scan(self, scan_id: str) -> ScanView:
        """A read-only view of one scan (one zarr.json read)."""
        self._require(scan_id)
        return open_view(
            self, scan_id, self.store, self.scan_path(scan_id),
            "in the index but its group is missing; run `bank.recover()` / "
            "`bank.rebuild_index()` on the writer side",
        )  # fmt: skip

    def opener(self, scan_ids: Iterable[str]) -> ScanOpener:
        """A small picklable reader of these scans that never reads the index (``ScanOpener``).

        For processes that read scans chosen elsewhere, such as DataLoader workers: each
        opening the bank would parse the whole index (about 300 MiB at 100,000 scans).
        """
        paths = {}
        for scan_id in scan_ids:
            self._require(scan_id)
            paths[scan_id] = self.scan_path(scan_id)
        options = None if self._options_from_env else self._storage_options
        return ScanOpener(self.location, options, paths)

    def __getitem__(self, scan_id: str) -> ScanView:
        return self.scan(scan_id)

    @property
    def store(self) -> zarr.abc.store.Store:
        """The bank's zarr store, read-only (also for scans the index does not list)."""
        return self._backend.store

    @property
    def local_root(self) -> Path | None:
        """The bank's folder on a local (or mounted) file system; None for a remote bank."""
        return self._backend.local_root

    def scan_ids_on_storage(self) -> list[str]:
        """Scan ids whose groups exist on storage: a listing, for checks and rebuilds.

        Readers use ``scan_ids`` (the index); this is what the index is checked against.
        On an object store: the scans whose indexed version (or plain folder) exists.
        """
        return self._backend.scans_on_storage()

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
        version = self._backend.stored_version(scan_id)
        return self._backend.nbytes(part_path(scan_id, part, version))

    def leftovers(self) -> list[str]:
        """Names under .staging/ and .trash/ and index-rows/ temps: writes in flight or
        interrupted by a crash.

        ``recover()`` (on the writer side) finishes or undoes the interrupted ones.
        On an object store: scan prefixes and rows no live row names, past or within
        the grace period.
        """
        return self._backend.leftovers()

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

        def fill(group: zarr.Group, current_token: str | None) -> None:
            fill_group(group, arrays, user_attrs, part, current_token, grid, self.encoding)

        self._backend.write(scan_id, part, scan_token, fill)
        return self.row(scan_id)

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
        with self._backend.scan_lock(scan_id):
            yield

    def read_scan_attrs(self, scan_id: str) -> dict | None:
        """A scan's attributes as stored now, bypassing the index (None if there is no scan)."""
        check_scan_id(scan_id)
        return self._backend.read_scan_attrs(scan_id)

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
        check_scan_id(scan_id)
        self._backend.delete(scan_id)

    def write_report(self, name: str, report: Mapping[str, Any]) -> str:
        """Store a flow report as reports/<name>-<UTC timestamp>.json; return its path.

        The timestamp looks like 20261128T043320.123456Z (on an object store followed
        by a random suffix: one PUT, so readers see the whole report or none).
        """
        self._require_writable()
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid report name {name!r}")
        return self._backend.put_report(name, json.dumps(to_jsonable(dict(report)), indent=1))

    def reports(self, name: str | None = None) -> list[str]:
        """Report paths (oldest first), optionally only those of one flow name."""
        return self._backend.reports(name)

    def recover(self, grace_s: float | None = None) -> list[str]:
        """Finish or undo writes interrupted by a crash; fix the index; return actions taken.

        On a local bank it also folds the pending index rows into index.json
        (`compact_index`; routine, so not an action), which is why every flow ends with it.
        On an object store: remove leftovers (objects no live row names) older than
        ``grace_s`` (default ``object_store.GRACE_S``) and refresh a lagging index.json.
        """
        self._require_writable()
        return self._backend.recover(grace_s)

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

    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyBankError(
                f"bank {self.location} is open read-only; use Bank.create(path) to write"
            )


def _reopen(location: str, mode: str, options: Mapping[str, Any] | None) -> Bank:
    """Unpickle a bank: its credential-free options, completed from this process's environment."""
    if options is not None:
        options = _opts.merged(_opts.from_environment(), options)
    return Bank.open(location, mode, options)


def _all_finite(a: np.ndarray) -> bool:
    """``np.isfinite(a).all()``; for float16 by the exponent bits (numpy's float16 path is slow)."""
    if a.dtype == np.float16:
        magnitude = np.bitwise_and(np.ascontiguousarray(a).view(np.uint16), 0x7FFF)
        return magnitude.size == 0 or int(magnitude.max()) < 0x7C00  # all-ones exponent: inf/NaN
    return bool(np.isfinite(a).all())
