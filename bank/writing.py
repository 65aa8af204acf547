"""What a writer of a bank uses besides `Bank.create` / `Bank.write_scan`.

``write_proposals`` stores a pipeline ProposalSet as one of a scan's proposal sets;
``proposal_nbytes`` measures, in memory, the bytes that set will take on storage
(for the per-proposal byte budget); ``Encoding`` is a bank's chunking and
compression; ``resolve_location`` turns a bank path into what other processes
should open; ``scan_token_of`` reads a scan's version token from its attributes
(`Bank.read_scan_attrs`), for ``scan_token=`` arguments; ``record_scan_attrs``
merges a writer's own records (e.g. ``source_stat``) into a published scan's
attributes without rewriting the scan.
"""

from .backend import scan_token_of
from .bank import resolve_location
from .encoding import Encoding
from .errors import StaleScanError
from .layout import DEFAULT_SET, check_set_name
from .proposal_store import proposal_nbytes, write_proposals
from .scan_records import record_scan_attrs

__all__ = [
    "DEFAULT_SET",
    "Encoding",
    "StaleScanError",
    "check_set_name",
    "proposal_nbytes",
    "record_scan_attrs",
    "resolve_location",
    "scan_token_of",
    "write_proposals",
]
