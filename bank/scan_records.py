"""A writer's own records about a published scan, updated without rewriting the scan.

`record_scan_attrs` merges top-level caller attributes (e.g. ``source_stat``, the size
and mtime of the files a scan was prepared from) into a scan's attributes and republishes
its index row; the arrays, the scan's token and its proposals stay as they are. On a
local bank the scan group's zarr.json is replaced atomically under the scan's lock
(readers see the old or the new document; `LocalBackend.record_attrs`). Object-store
versions are immutable, so there it records nothing and returns False: the caller
keeps its slower path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .jsonable import to_jsonable
from .layout import FORMAT_NAME, check_scan_id

if TYPE_CHECKING:
    from .bank import Bank


def record_scan_attrs(
    bank: Bank, scan_id: str, attrs: Mapping[str, Any], scan_token: str | None = None
) -> bool:
    """Merge ``attrs`` into the stored attributes of ``scan_id``; True when recorded.

    With ``scan_token`` (`ScanView.token` of the version the record is about) it raises
    StaleScanError instead when the scan was rewritten meanwhile.
    """
    check_scan_id(scan_id)
    if FORMAT_NAME in attrs:
        raise ValueError(f"attribute key {FORMAT_NAME!r} is reserved for the bank")
    if not bank.writable:
        return False
    return bank._backend.record_attrs(scan_id, to_jsonable(dict(attrs)), scan_token)
