"""Zarr v3 mask bank: the on-disk store of prepared scans, masks and proposals.

The public surface is what this package exports -- `Bank` and `ScanView`, the
proposals' writer and reader, the chunk cache for crops -- plus the modules
`bank.errors`, `bank.proposals` and `bank.browse`; the other modules spell the
on-disk layout and are the bank's own. See docs/bank-format.md.
"""

from .bank import Bank, resolve_location
from .chunk_cache import ChunkCache, Piece
from .encoding import Encoding
from .errors import (
    BankError,
    NotABankError,
    ReadOnlyBankError,
    UnknownScanError,
    UnsupportedFormatError,
)
from .layout import FORMAT_VERSION, proposal_layer_array
from .proposals import NoProposalsError, ProposalReader, write_proposals
from .scan import ScanView
from .storage_options import ENV_VAR as STORAGE_OPTIONS_ENV
from .storage_options import parse as parse_storage_options
from .storage_options import redacted_json as redacted_storage_options

__all__ = [
    "FORMAT_VERSION",
    "Bank",
    "BankError",
    "ChunkCache",
    "Encoding",
    "NoProposalsError",
    "NotABankError",
    "Piece",
    "ProposalReader",
    "ReadOnlyBankError",
    "STORAGE_OPTIONS_ENV",
    "ScanView",
    "UnknownScanError",
    "UnsupportedFormatError",
    "parse_storage_options",
    "proposal_layer_array",
    "redacted_storage_options",
    "resolve_location",
    "write_proposals",
]
