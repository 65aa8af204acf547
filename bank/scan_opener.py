"""Open a fixed set of a bank's scans by id, without reading the bank's index.

Why: a DataLoader worker reads a few scans at a time from a stream whose scans were chosen
in the parent. Opening the bank there parses the whole index -- about 1 s and 300 MiB per
worker at 100,000 scans, in every worker. ``Bank.opener(scan_ids)`` instead fixes each
scan's group path once, from the parent's open bank; what travels to a worker is the
location, the credential-free storage options and one short path per scan.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import zarr

from . import storage_options as _opts
from .errors import UnknownScanError
from .scan import ScanView, open_view


class ScanOpener:
    """Read-only views of the scans it was made for, as they were when it was made.

    Each process opens its own store on first use (never a handle inherited over a fork).
    A scan replaced after the opener was made is still read at the version it had then.
    """

    def __init__(
        self, location: str, options: Mapping[str, Any] | None, paths: Mapping[str, str]
    ) -> None:
        self.location = location
        self._options = None if options is None else dict(options)  # None: the environment's
        self._paths = dict(paths)
        self._store: Any = None
        self._pid = -1

    def __reduce__(self):
        """Pickle as the location, the options (credentials left out) and the paths."""
        options = None if self._options is None else _opts.without_secrets(self._options)
        return (_reopen_opener, (self.location, options, self._paths))

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, scan_id: object) -> bool:
        return scan_id in self._paths

    @property
    def store(self) -> zarr.abc.store.Store:
        """The bank's read-only store, opened in this process."""
        if self._store is None or self._pid != os.getpid():
            from .bank import _open_backend

            options, _ = _opts.resolve(self._options)
            self._store = _open_backend(self.location, options, writable=False).store
            self._pid = os.getpid()
        return self._store

    def scan(self, scan_id: str) -> ScanView:
        """A read-only view of one scan (one zarr.json read; no index)."""
        if scan_id not in self._paths:
            raise UnknownScanError(scan_id, len(self._paths), self.location)
        return open_view(
            self, scan_id, self.store, self._paths[scan_id],
            "gone from storage: it was replaced or deleted after this reader started; "
            "start it again",
        )  # fmt: skip


def _reopen_opener(location: str, options: Mapping[str, Any] | None, paths: Mapping[str, str]):
    """Unpickle an opener: its credential-free options, completed from this environment."""
    if options is not None:
        options = _opts.merged(_opts.from_environment(), options)
    return ScanOpener(location, options, paths)
