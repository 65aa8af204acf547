"""`Bank.summary()`: bank-wide figures computed from the index alone (fast for 10,000 scans)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .index import set_counts

if TYPE_CHECKING:
    from .bank import Bank


def _blank() -> dict:
    return {"scans": 0, "voxels": 0, "bytes": 0}


def _add(bucket: dict, voxels: int, nbytes: int) -> None:
    bucket["scans"] += 1
    bucket["voxels"] += voxels
    bucket["bytes"] += nbytes


def summarise(bank: Bank) -> dict:
    """Scans, voxels and bytes on disk, in total and per modality/dataset, plus proposal figures."""
    total = _blank()
    by_modality: dict[str, dict] = {}
    by_dataset: dict[str, dict] = {}
    n_with_props = n_props = prop_bytes = labelled = 0
    sets: dict[str, dict] = {}
    for row in bank.index_rows.values():  # no copies: summary must stay fast at 10,000 scans
        voxels = math.prod(row["shape"]) if row.get("shape") else 0
        nbytes = int(row.get("nbytes") or 0)
        _add(total, voxels, nbytes)
        _add(by_modality.setdefault(str(row.get("modality")), _blank()), voxels, nbytes)
        _add(by_dataset.setdefault(str(row.get("dataset")), _blank()), voxels, nbytes)
        labelled += bool(row.get("has_label"))
        if row.get("n_proposals"):
            n_with_props += 1
            n_props += int(row["n_proposals"])
            prop_bytes += int(row.get("proposals_nbytes") or 0)
        for name, got in set_counts(row).items():
            bucket = sets.setdefault(name, {"scans": 0, "proposals": 0, "bytes": 0})
            bucket["scans"] += 1
            bucket["proposals"] += int(got.get("n") or 0)
            bucket["bytes"] += int(got.get("bytes") or 0)
    return {
        "location": bank.location,
        "format_version": bank.format_version,
        "created_at": bank.created_at,
        "encoding": bank.encoding.to_dict(),
        "scans": total["scans"],
        "voxels": total["voxels"],
        "bytes": total["bytes"],
        "bytes_per_voxel": total["bytes"] / total["voxels"] if total["voxels"] else 0.0,
        "labelled_scans": labelled,
        "by_modality": dict(sorted(by_modality.items())),
        "by_dataset": dict(sorted(by_dataset.items())),
        "proposals": {
            "scans_with_proposals": n_with_props,
            "total": n_props,
            "per_scan": n_props / n_with_props if n_with_props else 0.0,
            "bytes": prop_bytes,
            "bytes_per_proposal": prop_bytes / n_props if n_props else 0.0,
        },
        "proposal_sets": dict(sorted(sets.items())),
    }
