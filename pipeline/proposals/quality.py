"""Proposal quality against evaluation labels: best Dice per structure, ABO, recall.

For a structure S, |P ∩ S| for every proposal P comes from one bincount of S
over each layer plus interval prefix sums, so scoring thousands of proposals
costs a few passes over the volume; many structures at once share one
contingency table (structure x layer label) per layer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LESION_NAMES = re.compile(r"lesion|nodule|tumou?r|metasta|cyst|mass", re.IGNORECASE)
#: Dice levels recall is reported at (``recall_50`` = share of structures with best Dice >= 0.5).
RECALL_LEVELS = (0.5, 0.7, 0.9)


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


def intersection_matrix(pa: ProposalArrays, index: np.ndarray, n: int) -> np.ndarray:
    """|P ∩ S_k| for structures k = 1..n marked in ``index`` (0 = none): (n, N) int64.

    One contingency table (structure x label) per layer, then interval prefix
    sums: the cost does not grow with the number of structures.
    """
    out = np.zeros((n, len(pa.starts)), np.int64)
    row_layer = np.repeat(pa.layer_of, np.diff(pa.indptr))
    flat = index.reshape(-1).astype(np.int64)
    sel_vox = flat > 0
    for j, lay in enumerate(pa.layers):
        rows = row_layer == j
        if not rows.any() or n == 0:
            continue
        labs = lay.reshape(-1)[sel_vox].astype(np.int64)
        size = max(int(lay.max(initial=0)), int(pa.stops[rows].max(initial=1))) + 1
        key = (flat[sel_vox] - 1) * size + labs
        table = np.bincount(key, minlength=n * size).reshape(n, size)
        prefix = np.zeros((n, size + 1), np.int64)
        np.cumsum(table, axis=1, out=prefix[:, 1:])
        out[:, rows] = prefix[:, pa.stops[rows]] - prefix[:, pa.starts[rows]]
    if pa.count == 0:
        return np.zeros((n, 0), np.int64)
    return np.add.reduceat(out, pa.indptr[:-1], axis=1)


def best_dice_all(source, masks: Sequence[np.ndarray]) -> np.ndarray:
    """Best Dice over all proposals for each of several disjoint masks (float, (len(masks),))."""
    pa = source if isinstance(source, ProposalArrays) else ProposalArrays.of(source)
    if not masks:
        return np.zeros(0)
    if pa.count == 0:
        return np.zeros(len(masks))
    index = np.zeros(masks[0].shape, np.int32)
    for k, m in enumerate(masks, start=1):
        index[m] = k
    sizes = np.bincount(index.reshape(-1), minlength=len(masks) + 1)[1:]
    inter = intersection_matrix(pa, index, len(masks))
    dice = 2 * inter / (pa.voxels[None, :] + sizes[:, None])
    return dice.max(axis=1)


def score(
    source,
    label: np.ndarray,
    names: dict[int, str] | None = None,
    min_voxels: int = 1,
    levels: Sequence[float] = RECALL_LEVELS,
) -> dict:
    """Per-structure best Dice (structures of >= ``min_voxels``) plus abo and recall_* for one scan."""
    pa = source if isinstance(source, ProposalArrays) else ProposalArrays.of(source)
    found = structures(label, names, min_voxels)
    best = best_dice_all(pa, [m for _, m in found])
    per = {name: float(d) for (name, _), d in zip(found, best, strict=True)}
    sizes = {name: int(m.sum()) for name, m in found}
    return summarise(per, levels) | {"structures": per, "sizes": sizes, "proposals": pa.count}


def recall_key(level: float) -> str:
    """``recall_50`` for 0.5, ``recall_95`` for 0.95."""
    return f"recall_{round(level * 100):d}"


def summarise(
    best: dict[str, float] | Sequence[float], levels: Sequence[float] = RECALL_LEVELS
) -> dict:
    """abo (mean best Dice) and recall at each Dice level (``recall_50``, ``recall_70``, ...)."""
    vals = np.asarray(list(best.values()) if isinstance(best, dict) else best, float)
    keys = [recall_key(v) for v in sorted({0.5, 0.7, *levels})]
    if len(vals) == 0:
        return {"abo": float("nan")} | {k: float("nan") for k in keys}
    out = {"abo": float(vals.mean())}
    for level, k in zip(sorted({0.5, 0.7, *levels}), keys, strict=True):
        out[k] = float((vals >= level).mean())
    return out
