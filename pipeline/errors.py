"""Errors for bad input scans.

A `ScanError` means "this scan cannot be used, and retrying will not help":
flows record it in the run report and move on to the next scan.
"""

from __future__ import annotations

from os import PathLike


class ScanError(Exception):
    """A scan that failed validation or processing, with the file and the reason."""

    def __init__(self, path: str | PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across Dask workers
        return (type(self), (self.path, self.reason))
