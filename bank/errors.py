"""Exceptions raised by the bank, with messages that say what to do next."""

from __future__ import annotations


class BankError(Exception):
    """Base class for every error the bank raises on purpose."""


class NotABankError(BankError, FileNotFoundError):
    """The path exists but is not a maskbank bank (or does not exist at all)."""

    def __init__(self, location: str, why: str) -> None:
        super().__init__(
            f"{location} is not a maskbank bank ({why}). Build one first with "
            f"`maskbank prepare <scans...> --bank {location}` or `bank.Bank.create({location!r})`."
        )
        self.location = location


class UnknownScanError(BankError, KeyError):
    """A scan id that the bank index does not list."""

    def __init__(self, scan_id: str, n_scans: int, location: str) -> None:
        super().__init__(scan_id)
        self.scan_id = scan_id
        self.n_scans = n_scans
        self.location = location

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return (
            f"no scan {self.scan_id!r} in bank {self.location} ({self.n_scans} scans exist; "
            "see bank.scan_ids)"
        )


class ReadOnlyBankError(BankError, PermissionError):
    """A write was attempted on a bank opened for reading."""


class UnsupportedFormatError(BankError):
    """The bank was written by a newer maskbank with a format this code cannot read."""


class LockTimeoutError(BankError):
    """A bank lock was not free within the timeout (another writer, or a stale lock)."""


class UnsafeFilesystemError(BankError):
    """The bank's file system lacks working locks or atomic renames, which writers rely on."""


class CorruptIndexError(BankError):
    """index.json cannot be parsed."""


class MissingChunkError(BankError):
    """A chunk or shard file inside an array's written extent is missing.

    Zarr would decode it as the fill value; the bank writes every chunk, so a missing
    file means the scan is being rewritten or was damaged.
    """


class StaleScanError(BankError):
    """A scan was rewritten after the data derived from it (e.g. proposals) was computed."""
