"""Proposal quality against evaluation labels: best Dice per structure, ABO, recall.

For a structure S, |P ∩ S| for every proposal P comes from one bincount of S
over each layer plus interval prefix sums, so scoring thousands of proposals
costs a few passes over the volume.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LESION_NAMES = re.compile(r"lesion|nodule|tumou?r|metasta|cyst|mass", re.IGNORECASE)


@dataclass
class ProposalArrays:
    """What scoring needs, from a ProposalSet or a bank ProposalReader (layers fully read)."""

    layers: list[np.ndarray]
    indptr: np.ndarray
    starts: np.ndarray
    stops: np.ndarray
    layer_of: np.ndarray
    voxels: np.ndarray

    @classmethod
    def of(cls, source) -> ProposalArrays:
        if hasattr(source, "layers") and isinstance(source.layers, dict):  # ProposalSet
            layers = [source.layers[n] for n in source.layer_names]
            voxels = source.table.get("voxels")
            if voxels is None:
                voxels = np.array([source.mask(i).sum() for i in range(source.count)])
        else:  # bank ProposalReader
            layers = [np.asarray(source.layer(j)[...]) for j in range(len(source.layer_names))]
            voxels = source.table["voxels"]
        return cls(
            layers, source.indptr, source.starts, source.stops, source.table["layer"], voxels
        )

    @property
    def count(self) -> int:
        return len(self.indptr) - 1


def intersections(pa: ProposalArrays, mask: np.ndarray) -> np.ndarray:
    """|P ∩ mask| for every proposal P (int64, (N,))."""
    rows = np.zeros(len(pa.starts), np.int64)
    row_layer = np.repeat(pa.layer_of, np.diff(pa.indptr))
    w = mask.reshape(-1)
    for j, lay in enumerate(pa.layers):
        sel = row_layer == j
        if not sel.any():
            continue
        c = np.bincount(lay.reshape(-1).astype(np.intp), weights=w)
        prefix = np.concatenate([[0], np.cumsum(c)])
        e = np.minimum(pa.stops[sel], len(c))
        rows[sel] = np.rint(prefix[e] - prefix[np.minimum(pa.starts[sel], e)]).astype(np.int64)
    if pa.count == 0:
        return np.zeros(0, np.int64)
    return np.add.reduceat(rows, pa.indptr[:-1])


def best_dice(source, mask: np.ndarray) -> tuple[float, int]:
    """(best Dice over all proposals, its index; -1 when there are none)."""
    pa = source if isinstance(source, ProposalArrays) else ProposalArrays.of(source)
    if pa.count == 0 or not mask.any():
        return 0.0, -1
    inter = intersections(pa, mask)
    dice = 2 * inter / (pa.voxels + int(mask.sum()))
    i = int(np.argmax(dice))
    return float(dice[i]), i


def structures(
    label: np.ndarray, names: dict[int, str] | None = None, min_voxels: int = 1
) -> list[tuple[str, np.ndarray]]:
    """(name, mask) per labelled structure: each label value, split into components for lesions.

    A value is split into connected components when its name looks like a
    lesion (lesion, nodule, tumour, ...) or, without names, when its largest
    component holds less than half of its voxels (scattered findings).
    """
    out = []
    for v in np.unique(label[label > 0]).tolist():
        m = label == v
        name = (names or {}).get(v, f"label{v}")
        cc, k = ndimage.label(m)
        split = False
        if k > 1:
            if names and v in names:
                split = bool(LESION_NAMES.search(names[v]))
            else:
                split = np.bincount(cc.reshape(-1))[1:].max() < 0.5 * m.sum()
        if split:
            for c in range(1, k + 1):
                part = cc == c
                if part.sum() >= min_voxels:
                    out.append((f"{name}#{c}", part))
        elif m.sum() >= min_voxels:
            out.append((name, m))
    return out


def score(source, label: np.ndarray, names: dict[int, str] | None = None) -> dict:
    """Per-structure best Dice plus abo, recall_50, recall_70 for one scan."""
    pa = source if isinstance(source, ProposalArrays) else ProposalArrays.of(source)
    per = {name: best_dice(pa, m)[0] for name, m in structures(label, names)}
    return summarise(per) | {"structures": per, "proposals": pa.count}


def summarise(best: dict[str, float] | Sequence[float]) -> dict:
    vals = np.asarray(list(best.values()) if isinstance(best, dict) else best, float)
    if len(vals) == 0:
        return {"abo": float("nan"), "recall_50": float("nan"), "recall_70": float("nan")}
    return {
        "abo": float(vals.mean()),
        "recall_50": float((vals >= 0.5).mean()),
        "recall_70": float((vals >= 0.7).mean()),
    }
