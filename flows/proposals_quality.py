"""How well a bank's proposals cover its labelled structures: the best Dice per structure.

For every scan with a label map and proposals, and every labelled structure of at least
``min_voxels`` voxels, the best Dice over all proposals of that scan; per scan and
overall the average best Dice (ABO) and recall at Dice ``levels``. With a baseline
(``slic`` or ``slic:N``) SLIC on the same stored image, grid and body mask is scored the
same way beside it. ``maskbank proposals-quality`` and the QA report print it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the bank and the proposal code load on use: the CLI imports SORTS
    from maskbank.bank.sampling import ProposalReader

SORTS = ("size", "abo", "name")


def baseline_set(scan, baseline: tuple[str, int]):
    """SLIC on the scan's stored (normalised) image, grid and body mask."""
    from maskbank.pipeline.proposals.baseline import slic_proposals

    image = np.asarray(scan.read("image"), np.float32)
    body = np.asarray(scan.read("body"), bool)
    return slic_proposals(image, body, scan.spacing, baseline[1])


def _headline(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k == "abo" or k.startswith("recall_")}


def scan_quality(
    scan,
    reader: ProposalReader,
    base_spec: tuple[str, int] | None,
    min_voxels: int,
    levels: Sequence[float],
) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """One labelled scan: its entry, its baseline's scores (or None), per-structure rows."""
    from maskbank.pipeline.proposals.quality import ProposalArrays, score

    sid = scan.scan_id
    label = np.asarray(scan.read("label"))
    names = {int(k): v for k, v in (scan.attrs.get("label_names") or {}).items()}
    sc = score(ProposalArrays.of(reader), label, names or None, min_voxels, levels)
    entry = {
        "scan_id": sid,
        **_headline(sc),
        "structures": sc["structures"],
        "sizes": sc["sizes"],
        "proposals": reader.count,
        "bytes_per_proposal": reader.nbytes_stored() / max(reader.count, 1),
    }
    base_sc = None
    if base_spec:
        base_ps = baseline_set(scan, base_spec)
        base_sc = score(base_ps, label, names or None, min_voxels, levels)
        entry["baseline"] = _headline(base_sc) | {
            "structures": base_sc["structures"],
            "proposals": base_ps.count,
        }
    rows = []
    for name, d in sc["structures"].items():
        row = {"scan_id": sid, "structure": name, "voxels": sc["sizes"][name], "best_dice": d}
        if base_sc is not None:
            row["baseline_dice"] = base_sc["structures"][name]
        rows.append(row)
    return entry, base_sc, rows


def bank_quality(
    bank,
    scan_ids=None,
    baseline: str | None = None,
    min_voxels: int = 1,
    levels=(0.5, 0.7, 0.9),
    opened: Mapping[str, Any] | None = None,
) -> dict:
    """Quality report of a bank: abo, recall_* and per-scan rows (with per-structure rows).

    With ``baseline`` (``slic`` or ``slic:N``) each scan and the overall summary
    also carry a ``baseline`` entry scored the same way. ``opened``: scans a caller
    already opened (id -> ``ScanView``), used instead of opening them again.
    """
    from maskbank.bank import NoProposalsError
    from maskbank.bank.sampling import ProposalReader
    from maskbank.pipeline.proposals.baseline import parse_baseline
    from maskbank.pipeline.proposals.quality import summarise

    base_spec = parse_baseline(baseline)
    scans, best_all, base_all, counts, nbytes, rows = [], [], [], [], 0, []
    opened = opened or {}
    for sid in scan_ids or bank.scan_ids:
        scan = opened[sid] if sid in opened else bank.scan(sid)
        try:
            reader = ProposalReader(scan)
        except NoProposalsError:
            continue
        counts.append(reader.count)
        nbytes += reader.nbytes_stored()
        if not scan.has("label"):
            continue
        entry, base_sc, scan_rows = scan_quality(scan, reader, base_spec, min_voxels, levels)
        best_all += list(entry["structures"].values())
        if base_sc is not None:
            base_all += list(base_sc["structures"].values())
        rows += scan_rows
        scans.append(entry)
    out = {
        **summarise(best_all, levels),
        "proposals_per_scan": float(np.mean(counts)) if counts else 0.0,
        "bytes_per_proposal": nbytes / max(sum(counts), 1),
        "scans_with_proposals": len(counts),
        "scans_scored": len(scans),
        "structures": len(best_all),
        "min_voxels": int(min_voxels),
        "levels": list(levels),
        "scans": scans,
        "rows": rows,
    }
    if base_spec:
        out["baseline"] = {
            "method": f"{base_spec[0]}:{base_spec[1]}",
            **summarise(base_all, levels),
        }
    return out


def sort_rows(rows: list[dict], by: str = "size") -> list[dict]:
    """Per-structure rows by size (smallest first), abo (worst best Dice first) or name."""
    if by not in SORTS:
        raise ValueError(f"sort by one of {SORTS}, not {by!r}")
    key = {
        "size": lambda r: (r["voxels"], r["scan_id"], r["structure"]),
        "abo": lambda r: (r["best_dice"], r["scan_id"], r["structure"]),
        "name": lambda r: (r["structure"], r["scan_id"]),
    }[by]
    return sorted(rows, key=key)
