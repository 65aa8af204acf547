"""What a pretraining checkpoint records about its data, for the evaluation's fairness check.

``evaluate`` compares the evaluation bank's scans with the scans a checkpoint was
pretrained on, by scan id and by the content hash of the source file (so a scan
prepared into two banks under two ids is still caught). Lightweight on purpose: the
trainer imports it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=4)
def _records(location: str, scan_ids: tuple[str, ...]) -> tuple[tuple[str, str | None], ...]:
    from maskbank.bank import Bank

    rows = {r["scan_id"]: r for r in Bank.open(location).index}
    return tuple((s, (rows.get(s) or {}).get("source_sha256")) for s in scan_ids)


def pretraining_scans(location: str, scan_ids: list[str]) -> list[dict[str, Any]]:
    """``[{"scan_id", "source_sha256"}]`` of the scans a run samples (read once per run)."""
    return [{"scan_id": s, "source_sha256": h} for s, h in _records(str(location), tuple(scan_ids))]
