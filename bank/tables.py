"""The bank as pandas tables: one row a scan, or one row a proposal.

Users filter, sort and plot with the tools they already know; these functions only
turn what the bank stores into columns. The scan table is built from the index
alone (opening a bank of 10,000 scans reads no scan); the proposal table reads one
scan's proposal table (a few small arrays), never a mask.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .index import set_counts

if TYPE_CHECKING:
    import pandas as pd

    from .proposal_store import ProposalReader

SCAN_COLUMNS = (
    "scan_id",
    "dataset",
    "modality",
    "shape",
    "spacing",
    "voxels",
    "volume_ml",
    "has_label",
    "n_proposals",
    "proposal_sets",
    "bytes",
    "proposals_bytes",
    "clip_low",
    "clip_high",
    "norm_mean",
    "norm_std",
    "source",
    "written_at",
)


def _norm(row: dict[str, Any]) -> dict[str, float]:
    norm = row.get("normalization") or {}
    clip = norm.get("clip") or (math.nan, math.nan)
    return {
        "clip_low": float(clip[0]),
        "clip_high": float(clip[1]),
        "norm_mean": float(norm.get("mean", math.nan)),
        "norm_std": float(norm.get("std", math.nan)),
    }


def scan_row(row: dict[str, Any]) -> dict[str, Any]:
    """One index row as table columns (missing fields of older banks become NaN/None)."""
    shape = tuple(int(v) for v in row.get("shape") or ())
    spacing = tuple(float(v) for v in row.get("spacing") or ())
    voxels = math.prod(shape) if shape else 0
    return {
        "scan_id": row["scan_id"],
        "dataset": row.get("dataset"),
        "modality": row.get("modality"),
        "shape": shape,
        "spacing": spacing,
        "voxels": voxels,
        "volume_ml": voxels * math.prod(spacing) / 1000.0 if spacing else math.nan,
        "has_label": bool(row.get("has_label")),
        "n_proposals": int(row.get("n_proposals") or 0),  # the default set's
        # Every set by name -> count (``"slic" in sets`` filters, ``sets["slic"]`` counts):
        # a scan's other sets are as browsable as 'default'.
        "proposal_sets": {name: int(got.get("n") or 0) for name, got in set_counts(row).items()},
        "bytes": int(row.get("nbytes") or 0),
        "proposals_bytes": int(row.get("proposals_nbytes") or 0),
        **_norm(row),
        "source": row.get("source_path"),
        "written_at": row.get("written_at"),
    }


def scan_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Index rows -> a DataFrame indexed by scan id, columns ``SCAN_COLUMNS``."""
    import pandas as pd

    frame = pd.DataFrame([scan_row(r) for r in rows], columns=list(SCAN_COLUMNS))
    return frame.set_index("scan_id", drop=False).rename_axis(None)


def proposal_table(reader: ProposalReader, spacing: tuple[float, float, float]) -> pd.DataFrame:
    """One scan's proposals -> a DataFrame indexed by proposal id.

    Columns: ``source`` (the generator or imported set that made it), ``level``,
    ``layer``, ``voxels``, ``volume_ml``, the bounding box ``x0 y0 z0 x1 y1 z1``
    (voxels, half-open), the centroid ``cx cy cz`` (voxels) and every other feature
    column the bank stores (e.g. ``compactness``, ``contrast``).
    """
    import pandas as pd

    table = reader.table
    n = int(reader.count)
    cols: dict[str, Any] = {"id": np.arange(n)}
    for name in ("source", "level", "layer", "voxels"):
        if name in table:
            cols[name] = np.asarray(table[name])
    if "voxels" in cols:
        cols["volume_ml"] = cols["voxels"] * (math.prod(spacing) / 1000.0)
    if "bbox" in table:
        bbox = np.asarray(table["bbox"]).reshape(n, 6)
        for i, name in enumerate(("x0", "y0", "z0", "x1", "y1", "z1")):
            cols[name] = bbox[:, i]
    if "centroid" in table:
        cen = np.asarray(table["centroid"]).reshape(n, 3)
        for i, name in enumerate(("cx", "cy", "cz")):
            cols[name] = cen[:, i]
    for name, values in table.items():
        arr = np.asarray(values)
        if name not in cols and name not in ("bbox", "centroid") and arr.ndim == 1:
            cols[name] = arr
    return pd.DataFrame(cols).set_index("id", drop=False).rename_axis(None)
