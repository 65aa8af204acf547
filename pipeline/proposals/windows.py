"""Intensity windows + 3D connected components (optionally split by a distance watershed).

Windows are disjoint intensity bands, so the components of all bands of one
band set share a single label layer.  When a component is split by the
distance-transform watershed its pieces get consecutive labels, so the whole
component stays one interval and each piece another: both are proposals.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from maskbank.pipeline.proposals.supervoxels import grow_labels

#: Disjoint CT bands in HU: air/lung, fat, soft tissue, contrast/vessels and
#: bone.  Edges sit in the gaps between tissue classes (-30 between fat and
#: water, 120 between soft tissue and enhanced blood): an edge through a
#: tissue (e.g. 35 HU, muscle/blood) turns noise into confetti components that
#: are useless as proposals and expensive to store.
CT_BANDS: tuple[tuple[float, float], ...] = (
    (-1100.0, -500.0),
    (-190.0, -30.0),
    (-30.0, 120.0),
    (120.0, 300.0),
    (300.0, 4000.0),
)


#: Coarse CT bands: air/lung, everything denser than lung (isolates nodules and
#: ground-glass findings inside the lungs), and dense (contrast, bone).
CT_COARSE_BANDS: tuple[tuple[float, float], ...] = (
    (-1100.0, -500.0),
    (-500.0, 200.0),
    (200.0, 4000.0),
)


def percentile_bands(
    image: np.ndarray, body: np.ndarray, edges: tuple[float, ...]
) -> tuple[tuple[float, float], ...]:
    """Disjoint bands between the given percentiles of the intensities inside the body."""
    vals = np.percentile(image[body], edges) if body.any() else np.zeros(len(edges))
    vals[0], vals[-1] = float(image.min()) - 1.0, float(image.max()) + 1.0  # finite: stored as JSON
    return tuple((float(a), float(b)) for a, b in zip(vals[:-1], vals[1:], strict=True) if b > a)


def _split(component: np.ndarray, spacing, min_distance_mm: float) -> tuple[np.ndarray, int]:
    """Distance-transform watershed pieces of one component (labels 1..k).

    Runs on a 2x-subsampled grid (the EDT dominates the cost) and maps the
    pieces back; full-resolution voxels the coarse grid missed take the label
    of a labelled neighbour.
    """
    f = 2 if min(component.shape) >= 8 else 1
    coarse = component[::f, ::f, ::f]
    sp = [s * f for s in spacing]
    dist = ndimage.distance_transform_edt(coarse, sampling=sp)
    size = [max(3, int(round(2 * min_distance_mm / s)) | 1) for s in sp]
    peaks = (dist == ndimage.maximum_filter(dist, size=size)) & (dist >= min_distance_mm / 2)
    markers, k = ndimage.label(peaks)
    if k < 2:
        return component.astype(np.int32), 1
    pieces = watershed(-dist, markers, mask=coarse).astype(np.int32)
    for ax in range(3):
        pieces = np.repeat(pieces, f, axis=ax)
    pieces = pieces[: component.shape[0], : component.shape[1], : component.shape[2]]
    pieces[~component] = 0
    grow_labels(pieces, component, steps=2 * f)
    pieces[component & (pieces == 0)] = 1
    return pieces, int(k)


def window_layer(
    image: np.ndarray,
    body: np.ndarray,
    spacing,
    bands: tuple[tuple[float, float], ...],
    min_voxels: int,
    smooth_mm: float = 1.0,
    split_min_voxels: int | None = None,
    split_distance_mm: float = 12.0,
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """(label layer, [(start, stop, band index), ...]) for components >= min_voxels.

    Components bigger than ``split_min_voxels`` are also split by a
    distance-transform watershed; the pieces are extra proposals.
    """
    img = image.astype(np.float32, copy=False)
    if smooth_mm > 0:
        img = ndimage.gaussian_filter(img, [smooth_mm / s for s in spacing])
    layer = np.zeros(image.shape, np.int32)
    intervals: list[tuple[int, int, int]] = []
    nxt = 1
    for b, (lo, hi) in enumerate(bands):
        sel = body & (img >= lo) & (img < hi)
        if not sel.any():
            continue
        cc, k = ndimage.label(sel)
        sizes = np.bincount(cc.reshape(-1), minlength=k + 1)
        objs = ndimage.find_objects(cc)
        for c in np.flatnonzero(sizes[1:] >= min_voxels) + 1:
            sl = objs[c - 1]
            comp = cc[sl] == c
            if split_min_voxels is not None and sizes[c] >= split_min_voxels:
                pieces, n = _split(comp, spacing, split_distance_mm)
            else:
                pieces, n = comp.astype(np.int32), 1
            view = layer[sl]
            view[comp] = pieces[comp] + (nxt - 1)
            if n > 1:
                psz = np.bincount(pieces[comp], minlength=n + 1)[1:]
                for p in np.flatnonzero(psz >= min_voxels):
                    intervals.append((nxt + int(p), nxt + int(p) + 1, b))
            intervals.append((nxt, nxt + n, b))
            nxt += n
    return layer, intervals
