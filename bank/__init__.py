"""Zarr v3 mask bank: the on-disk store of prepared scans, masks and proposals.

`Bank` and `ScanView` are the whole public surface; see docs/bank-format.md.
"""

from .bank import Bank
from .encoding import Encoding
from .errors import (
    BankError,
    NotABankError,
    ReadOnlyBankError,
    UnknownScanError,
    UnsupportedFormatError,
)
from .layout import FORMAT_VERSION
from .scan import ScanView

__all__ = [
    "FORMAT_VERSION",
    "Bank",
    "BankError",
    "Encoding",
    "NotABankError",
    "ReadOnlyBankError",
    "ScanView",
    "UnknownScanError",
    "UnsupportedFormatError",
]
