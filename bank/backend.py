"""What `Bank` asks of the storage under it: the private interface of its two backends.

`Bank` validates, encodes and serves reads; where and how a scan is published, how
the index is kept and what a crash leaves behind is its backend's:

- `bank.local_backend.LocalBackend`: a folder on a local or shared file system;
  scans published by directory renames under per-scan locks, each scan's row
  committed as a file of its own and folded into index.json by compaction
  (``bank.publish``, ``bank.index_rows``, ``bank.locks``);
- `bank.object_backend.ObjectStoreBackend`: S3 and the like (no renames, no
  locks); every scan version under its own prefix, committed by one row object,
  index.json a snapshot of the rows (``bank.object_store``).

The in-memory index (``rows``) belongs to the backend too: `Backend.write` ends by
publishing the scan's row to other processes and updating ``rows``, and
`Backend.refresh` reads what other processes published. How a row is published
is each backend's own business (one row file per scan, ``index-rows/<scan>.json``,
on local banks; one row object per scan version on object stores; index.json a
snapshot of the rows on both), so it can change without `Bank` knowing.
Format: docs/bank-format.md.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import zarr

from .errors import BankError, CorruptIndexError, StaleScanError
from .index import make_row, utc_now
from .layout import (
    DEFAULT_SET,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    REPORTS_DIR,
    part_path,
    set_of_part,
)

#: Fills a new scan (part) group: called with the group and the token of the scan the
#: part belongs to (None for a whole scan); writes its arrays, then its attributes.
Fill = Callable[[zarr.Group, str | None], None]


class Backend:
    """Storage of one bank: reads shared by both backends, writes each backend's own."""

    def __init__(
        self, location: str, store: zarr.abc.store.Store, fs: fsspec.AbstractFileSystem, root: str
    ) -> None:
        self.location = location
        self.store = store  # read-only
        self.fs = fs
        self.fs_root = root.rstrip("/")
        self.rows: dict[str, dict] = {}
        self.index_missing = False
        self.index_error: str | None = None

    @property
    def local_root(self) -> Path | None:
        """The bank's folder on a local (or mounted) file system; None for a remote bank."""
        return None

    # ------------------------------------------------------------------ the index
    def refresh(self, strict: bool) -> None:
        """Re-read the rows other processes published (``rows``, ``index_missing/error``)."""
        raise NotImplementedError

    def rebuild_index(self) -> None:
        """Rewrite the index from the scan groups themselves."""
        raise NotImplementedError

    def compact_index(self, blocking: bool = True) -> int:
        """Fold the rows published since the last compaction into index.json; return how
        many. Nothing to fold by default (object stores keep their snapshot current as
        they write, and `recover` rewrites a lagging one)."""
        return 0

    def scans_on_storage(self) -> list[str]:
        """Scan ids whose groups exist on storage (what the index is checked against)."""
        raise NotImplementedError

    def stored_version(self, scan_id: str) -> str | None:
        """The version whose objects `Bank.stored_nbytes` measures (None: plain folders)."""
        return None

    def read_scan_attrs(self, scan_id: str) -> dict | None:
        """A scan's attributes as stored now, bypassing ``rows`` (None if there is no scan)."""
        return self.attrs_or_none(part_path(scan_id, None))

    def attrs_or_none(self, rel: str) -> dict | None:
        """`read_attrs`, with a zarr.json cut short taken as no usable group."""
        try:
            return self.read_attrs(rel)
        except ValueError:
            return None

    # ------------------------------------------------------------------ writing
    def write(self, scan_id: str, part: str | None, scan_token: str | None, fill: Fill) -> None:
        """Write a scan (``part`` None) or one part of it through ``fill``, then publish it.

        With ``scan_token``, a part is refused (StaleScanError) once the scan it belongs
        to was rewritten.
        """
        raise NotImplementedError

    def delete(self, scan_id: str) -> None:
        raise NotImplementedError

    def record_attrs(self, scan_id: str, attrs: dict, scan_token: str | None) -> bool:
        """Merge a writer's records into a published scan's attributes, in place; False
        where published versions are immutable (the caller rewrites the scan instead)."""
        raise NotImplementedError

    def scan_lock(self, scan_id: str) -> contextlib.AbstractContextManager[None]:
        """One scan's write lock (re-entrant in a thread); a no-op where there are no locks."""
        return contextlib.nullcontext()

    def recover(self, grace_s: float | None) -> list[str]:
        """Finish or undo interrupted writes; mend the index; return the actions taken."""
        raise NotImplementedError

    def leftovers(self) -> list[str]:
        """Writes in flight or interrupted, by path relative to the bank root."""
        raise NotImplementedError

    def leftover_problems(self) -> list[str]:
        """The leftovers `verify` reports, each with what it is."""
        raise NotImplementedError

    def put_report(self, name: str, text: str) -> str:
        """Store a report's JSON text under reports/; return its path or URL."""
        raise NotImplementedError

    # ------------------------------------------------------------------ storage reads
    def nbytes(self, rel: str) -> int:
        """Bytes stored under a path relative to the bank root (0 if absent)."""
        raise NotImplementedError

    def subfolders(self, rel: str) -> list[str]:
        """Names of the folders directly under ``rel`` (empty if absent)."""
        raise NotImplementedError

    def url(self, rel: str) -> str:
        return f"{self.fs_root}/{rel}"

    def read_text(self, rel: str) -> str | None:
        """UTF-8 text of a bank file, None if absent; bytes that are not UTF-8 are corruption."""
        try:
            with self.fs.open(self.url(rel), "rb") as fh:
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

    def read_attrs(self, rel: str) -> dict | None:
        """Attributes of the group at rel (None if there is no group there)."""
        text = self.read_text(f"{rel}/zarr.json")
        if text is None:
            return None
        return json.loads(text).get("attributes", {})

    def row_for(self, scan_id: str, version: str | None = None) -> dict:
        """The index row of a scan from its group (of ``version``, on object stores)."""
        attrs = self.read_attrs(part_path(scan_id, None, version)) or {}
        sets = self.proposal_sets_at(scan_id, version)
        default_attrs, default_bytes = sets.get(DEFAULT_SET, (None, 0))
        nbytes = self.nbytes(part_path(scan_id, None, version))
        row = make_row(scan_id, attrs, default_attrs, nbytes, default_bytes, sets)
        if version is not None:
            row["version"] = version
        return row

    def proposal_set_parts(self, scan_id: str, version: str | None = None) -> list[str]:
        """Proposal set parts stored in a scan's group (of ``version`` on object stores)."""
        names = self.subfolders(part_path(scan_id, None, version))
        return sorted(n for n in names if set_of_part(n) is not None)

    def proposal_sets_at(
        self, scan_id: str, version: str | None = None
    ) -> dict[str, tuple[dict, int]]:
        """Set name -> (part attributes, bytes stored) of every complete proposal set."""
        sets = {}
        for part in self.proposal_set_parts(scan_id, version):
            attrs = self.read_attrs(part_path(scan_id, part, version))
            if attrs is not None:
                nbytes = self.nbytes(part_path(scan_id, part, version))
                sets[set_of_part(part)] = (attrs, nbytes)
        return sets

    def reports(self, name: str | None = None) -> list[str]:
        """Report paths (oldest first), optionally only those of one flow name."""
        prefix = f"{name}-" if name else ""
        folder = self.url(REPORTS_DIR)
        self.fs.invalidate_cache(folder)
        try:
            paths = [p for p in self.fs.ls(folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return []
        return sorted(p for p in paths if Path(p).name.startswith(prefix))


def root_attrs(encoding_dict: dict[str, Any]) -> dict:
    """The root group's attributes of a new bank."""
    return {
        FORMAT_NAME: {
            "format_version": FORMAT_VERSION,
            "created_at": utc_now(),
            "encoding": encoding_dict,
            "layout": "docs/bank-format.md",
        }
    }


def check_scan_token(
    location: str, scan_id: str, part: str, wanted: str | None, current: str | None
) -> None:
    """StaleScanError when a part computed from scan version ``wanted`` meets ``current``."""
    if wanted is not None and wanted != current:
        raise StaleScanError(
            f"scan {scan_id!r} of {location} was rewritten after its {part} "
            f"were computed (scan version {wanted}, now {current}); compute "
            f"them again from the current scan (e.g. `maskbank propose BANK`)"
        )


def scan_token_of(attrs: dict[str, Any]) -> str | None:
    """The version token of a scan from its attributes (written_at for scans older than tokens)."""
    info = attrs.get(FORMAT_NAME) or {}
    token = info.get("token") or info.get("written_at")
    return None if token is None else str(token)
