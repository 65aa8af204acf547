"""A writer's own records about a published scan, updated without rewriting the scan.

`record_scan_attrs` merges top-level caller attributes (e.g. ``source_stat``, the size
and mtime of the files a scan was prepared from) into a scan's attributes and republishes
its index row; the arrays, the scan's token and its proposals stay as they are. On a
local bank the scan group's zarr.json is replaced atomically under the scan's lock
(readers see the old or the new document). Object-store versions are immutable, so
there it records nothing and returns False: the caller keeps its slower path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .backend import check_scan_token, scan_token_of
from .index import atomic_write_text
from .jsonable import to_jsonable
from .layout import FORMAT_NAME, check_scan_id, part_path

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
    root = bank.local_root
    if root is None or not bank.writable:
        return False
    backend = bank._backend
    with bank.scan_lock(scan_id):
        path = root / part_path(scan_id, None) / "zarr.json"
        doc = json.loads(path.read_text(encoding="utf-8"))
        current = scan_token_of(doc.get("attributes") or {})
        check_scan_token(bank.location, scan_id, "record", scan_token, current)
        doc.setdefault("attributes", {}).update(to_jsonable(dict(attrs)))
        atomic_write_text(path, json.dumps(doc, indent=2))
        backend.publish_row(scan_id, backend.row_for(scan_id))
    return True
