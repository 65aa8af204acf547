"""Import masks made elsewhere (TotalSegmentator, SAM-based tools, experts) as proposals.

External masks are just another source: they become layers of the same
ProposalSet format and mix freely with generated proposals via ``merge_sets``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from maskbank.pipeline.proposals.proposal_set import ProposalSet


def from_label_map(
    label_map: np.ndarray,
    source: str = "external",
    split_components: bool = False,
    layer_name: str | None = None,
) -> ProposalSet:
    """One proposal per non-zero label value (or per connected component of each).

    Label values are renumbered densely in ascending order so that each proposal
    is a single label interval; negative values are rejected.
    """
    lm = np.asarray(label_map)
    if lm.ndim != 3:
        raise ValueError(f"label map must be 3D, got shape {lm.shape}")
    if not np.issubdtype(lm.dtype, np.integer):
        if not np.all(np.mod(lm, 1) == 0):
            raise ValueError("label map must hold integer label values")
        lm = lm.astype(np.int64)
    if lm.size and lm.min() < 0:
        raise ValueError("label map values must be >= 0")
    name = layer_name or f"{source}"
    if split_components:
        out = np.zeros(lm.shape, np.int32)
        n = 0
        for v in np.unique(lm[lm > 0]):
            cc, k = ndimage.label(lm == v)
            out[cc > 0] = cc[cc > 0] + n
            n += k
        dense = out
    else:
        values, inv = np.unique(lm, return_inverse=True)
        inv = inv.reshape(lm.shape)
        if len(values) and values[0] == 0:
            dense = inv.astype(np.int32)
            n = len(values) - 1
        else:
            dense = (inv + 1).astype(np.int32)
            n = len(values)
    dtype = np.uint16 if n < 65535 else np.int32
    labels = np.arange(1, n + 1)
    return ProposalSet.from_intervals(
        lm.shape,
        name,
        dense.astype(dtype),
        labels,
        labels + 1,
        source,
        0,
        {"kind": "external", "source": source},
    )


def from_masks(masks: Sequence[np.ndarray] | np.ndarray, source: str = "external") -> ProposalSet:
    """Possibly overlapping binary masks -> proposals, packed into few layers.

    Masks are placed greedily into the first layer where they overlap no mask
    already there, so non-overlapping masks share one label map.
    """
    masks = [np.asarray(m, bool) for m in masks]
    if not masks:
        raise ValueError("from_masks needs at least one mask")
    shape = masks[0].shape
    layers: list[np.ndarray] = []
    counts: list[int] = []
    where: list[tuple[int, int]] = []
    for m in masks:
        if m.shape != shape:
            raise ValueError(f"mask shape {m.shape} differs from {shape}")
        if not m.any():
            raise ValueError("empty mask cannot be a proposal")
        j = next((k for k, lay in enumerate(layers) if not np.any(lay[m])), len(layers))
        if j == len(layers):
            layers.append(np.zeros(shape, np.int32))
            counts.append(0)
        counts[j] += 1
        layers[j][m] = counts[j]
        where.append((j, counts[j]))
    names = [f"{source}" if j == 0 else f"{source}_{j + 1}" for j in range(len(layers))]
    n = len(masks)
    lab = np.array([w[1] for w in where])
    return ProposalSet(
        shape,
        {
            nm: lay.astype(np.uint16 if c < 65535 else np.int32)
            for nm, lay, c in zip(names, layers, counts, strict=True)
        },
        np.arange(n + 1),
        lab,
        lab + 1,
        {
            "source": np.full(n, source),
            "layer": np.array([w[0] for w in where], np.int16),
            "level": np.zeros(n, np.int16),
        },
        {nm: {"kind": "external", "source": source} for nm in names},
    )
