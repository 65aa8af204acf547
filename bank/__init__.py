"""Zarr v3 mask bank: the on-disk store of prepared scans, masks and proposals.

``from maskbank.bank import ...`` gives what a reader of a bank needs, e.g. in a
notebook: `Bank` (open, list, tabulate), `ScanView` (one scan's arrays, proposal
masks and tables, viewers, NIfTI export), the errors a read raises and
`masks_to_labels` for overlays. Writers and the sampler use named public modules:

- ``maskbank.bank.writing``: `write_proposals`, `proposal_nbytes` (a set's stored
  bytes, for the byte budget), `Encoding`, `resolve_location`, set names;
- ``maskbank.bank.sampling``: the crop read path (`ProposalReader`, `ChunkCache`,
  `Piece`, `proposal_layer_array`);
- ``maskbank.bank.storage_options``: fsspec options from the CLI or environment;
- ``maskbank.bank.errors`` (every error) and ``maskbank.bank.browse`` (HTML views).

The other modules spell the on-disk layout and are the bank's own. See
docs/bank-format.md.
"""

from .bank import Bank
from .errors import (
    BankError,
    NotABankError,
    ReadOnlyBankError,
    UnknownScanError,
    UnsupportedFormatError,
)
from .proposal_store import NoProposalsError, masks_to_labels
from .scan import ScanView

__all__ = [
    "Bank",
    "BankError",
    "NoProposalsError",
    "NotABankError",
    "ReadOnlyBankError",
    "ScanView",
    "UnknownScanError",
    "UnsupportedFormatError",
    "masks_to_labels",
]
