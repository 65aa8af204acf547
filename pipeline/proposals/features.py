"""Per-proposal features computed from per-label statistics of each layer.

Nothing here decodes a proposal mask: every statistic is additive over labels
(prefix sums over member intervals) or comes from the label adjacency edges
(boundary area between labels), so thousands of proposals cost milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from maskbank.pipeline.proposals.proposal_set import ProposalSet


@dataclass
class LayerStats:
    """Per-label statistics of one label layer (index = label, 0 = unlabelled)."""

    counts: np.ndarray  # (L,) voxels
    sums: np.ndarray  # (L,) intensity sum
    coord_sums: np.ndarray  # (L, 3) voxel-coordinate sums
    body: np.ndarray  # (L,) voxels inside the body mask
    bbox: np.ndarray  # (L, 6) int64, empty labels: (big, big, big, -1, -1, -1)
    border_area: np.ndarray  # (L,) mm^2 of faces on the volume border
    edges: np.ndarray  # (E, 2) label pairs a < b that touch
    edge_area: np.ndarray  # (E,) shared face area in mm^2

    @property
    def n_labels(self) -> int:
        return len(self.counts)

    def total_area(self) -> np.ndarray:
        """Surface area of each label region (faces to other labels + volume border)."""
        area = self.border_area.copy()
        np.add.at(area, self.edges[:, 0], self.edge_area)
        np.add.at(area, self.edges[:, 1], self.edge_area)
        return area

    def relabel(self, lut: np.ndarray) -> LayerStats:
        """Stats of the layer ``lut[layer]`` for a one-to-one relabelling ``lut`` (lut[0] = 0)."""
        n = int(lut.max(initial=0)) + 1
        inv = np.zeros(n, np.int64)
        inv[lut] = np.arange(len(lut))
        e = lut[self.edges]
        e.sort(axis=1)
        return LayerStats(
            self.counts[inv],
            self.sums[inv],
            self.coord_sums[inv],
            self.body[inv],
            self.bbox[inv],
            self.border_area[inv],
            e,
            self.edge_area,
        )

    def means(self) -> np.ndarray:
        return self.sums / np.maximum(self.counts, 1)


def adjacency(
    layer: np.ndarray, spacing=(1.0, 1.0, 1.0), weight: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Label pairs (a < b) sharing faces and their shared area in mm^2 (vectorised).

    With ``weight`` (a volume, e.g. gradient magnitude) also returns, per pair,
    the number of shared faces and the sum over those faces of the larger of
    the two voxels' weights (the boundary strength used for merging).
    """
    n = int(layer.max(initial=0)) + 1
    keys, areas, wsums = [], [], []
    for axis in range(3):
        a = np.moveaxis(layer, axis, 0)
        lo, hi = a[:-1], a[1:]
        diff = lo != hi
        u, v = lo[diff].astype(np.int64), hi[diff].astype(np.int64)
        keys.append(np.minimum(u, v) * n + np.maximum(u, v))
        face = float(np.prod([s for i, s in enumerate(spacing) if i != axis]))
        areas.append(np.full(len(u), face))
        if weight is not None:
            w = np.moveaxis(weight, axis, 0)
            wsums.append(np.maximum(w[:-1][diff], w[1:][diff]).astype(np.float64))
    allk = np.concatenate(keys)
    uk, inv = np.unique(allk, return_inverse=True)
    edges = np.stack([uk // n, uk % n], axis=1) if len(uk) else np.zeros((0, 2), np.int64)
    area = np.bincount(inv, weights=np.concatenate(areas), minlength=len(uk))
    if weight is None:
        return edges, area
    faces = np.bincount(inv, minlength=len(uk))
    wsum = np.bincount(inv, weights=np.concatenate(wsums), minlength=len(uk))
    return edges, area, faces, wsum


def layer_stats(
    layer: np.ndarray,
    image: np.ndarray | None,
    body: np.ndarray | None,
    spacing=(1.0, 1.0, 1.0),
    edges: tuple[np.ndarray, np.ndarray] | None = None,
) -> LayerStats:
    """One pass of bincounts over a label layer (``edges`` = precomputed adjacency)."""
    lab = np.ascontiguousarray(layer).reshape(-1).astype(np.intp, copy=False)
    n = int(lab.max(initial=0)) + 1
    counts = np.bincount(lab, minlength=n)
    sums = (
        np.bincount(lab, weights=image.reshape(-1), minlength=n)
        if image is not None
        else np.zeros(n)
    )
    bodyc = (
        np.bincount(lab, weights=body.reshape(-1), minlength=n).astype(np.int64)
        if body is not None
        else counts.copy()
    )
    coord = np.zeros((n, 3))
    for ax in range(3):
        # sum of coordinates along `ax` = sum over slices of index * per-slice counts
        moved = np.moveaxis(layer, ax, 0)
        for i in range(moved.shape[0]):
            coord[:, ax] += i * np.bincount(moved[i].reshape(-1), minlength=n)
    big = np.iinfo(np.int64).max // 4
    bbox = np.tile(np.array([big, big, big, -1, -1, -1], np.int64), (n, 1))
    for lab_minus1, sl in enumerate(ndimage.find_objects(layer)):
        if sl is not None:
            bbox[lab_minus1 + 1] = [sl[0].start, sl[1].start, sl[2].start] + [
                sl[0].stop,
                sl[1].stop,
                sl[2].stop,
            ]
    border = np.zeros(n)
    for axis in range(3):
        face = float(np.prod([s for i, s in enumerate(spacing) if i != axis]))
        a = np.moveaxis(layer, axis, 0)
        border += face * (
            np.bincount(a[0].reshape(-1), minlength=n) + np.bincount(a[-1].reshape(-1), minlength=n)
        )
    edges, area = adjacency(layer, spacing) if edges is None else edges
    return LayerStats(counts, sums, coord, bodyc, bbox, border, edges, area)


def _interval_sums(values: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Sum of values[start:stop] per interval via a prefix sum (values may be 2D)."""
    c = np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(values, axis=0)])
    return c[stops] - c[starts]


def _interval_reduce(ufunc, values: np.ndarray, starts: np.ndarray, stops: np.ndarray):
    """ufunc.reduce of values[start:stop] per interval (stops may reach len(values))."""
    padded = np.concatenate([values, values[-1:]])
    idx = np.stack([starts, stops], axis=1).reshape(-1)
    return ufunc.reduceat(padded, idx, axis=0)[::2]


def _per_proposal(ps: ProposalSet, rows_values: np.ndarray, ufunc=np.add) -> np.ndarray:
    """Combine per-interval values into per-proposal values over the CSR rows."""
    return ufunc.reduceat(rows_values, ps.indptr[:-1], axis=0)


def basic_stats(ps: ProposalSet, stats: dict[str, LayerStats]) -> dict[str, np.ndarray]:
    """voxels, body voxels, bbox and centroid for every proposal."""
    n = ps.count
    out = {
        "voxels": np.zeros(n, np.int64),
        "body_voxels": np.zeros(n, np.int64),
        "bbox": np.zeros((n, 6), np.int32),
        "centroid": np.zeros((n, 3), np.float32),
        "intensity": np.zeros(n, np.float32),
    }
    if n == 0:
        return out
    row_layer = np.repeat(ps.table["layer"], np.diff(ps.indptr))
    vox = np.zeros(len(ps.starts))
    bodyv = np.zeros(len(ps.starts))
    isum = np.zeros(len(ps.starts))
    csum = np.zeros((len(ps.starts), 3))
    lo = np.zeros((len(ps.starts), 3), np.int64)
    hi = np.zeros((len(ps.starts), 3), np.int64)
    for j, name in enumerate(ps.layer_names):
        r = row_layer == j
        if not r.any():
            continue
        st = stats[name]
        s, e = ps.starts[r], np.minimum(ps.stops[r], st.n_labels)
        if np.any(s >= e):
            raise ValueError(f"layer {name!r}: a member interval refers to labels not present")
        vox[r] = _interval_sums(st.counts.astype(float), s, e)
        bodyv[r] = _interval_sums(st.body.astype(float), s, e)
        isum[r] = _interval_sums(st.sums, s, e)
        csum[r] = _interval_sums(st.coord_sums, s, e)
        lo[r] = _interval_reduce(np.minimum, st.bbox[:, :3], s, e)
        hi[r] = _interval_reduce(np.maximum, st.bbox[:, 3:], s, e)
    out["voxels"] = np.rint(_per_proposal(ps, vox)).astype(np.int64)
    out["body_voxels"] = np.rint(_per_proposal(ps, bodyv)).astype(np.int64)
    v = np.maximum(out["voxels"], 1)
    out["intensity"] = (_per_proposal(ps, isum) / v).astype(np.float32)
    out["centroid"] = (_per_proposal(ps, csum) / v[:, None]).astype(np.float32)
    bb_lo = _per_proposal(ps, lo, np.minimum)
    bb_hi = _per_proposal(ps, hi, np.maximum)
    out["bbox"] = np.concatenate([bb_lo, bb_hi], axis=1).astype(np.int32)
    return out


def _edge_features(
    ps: ProposalSet, j: int, st: LayerStats, chunk_elems: int = 8_000_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(internal edge area, boundary area to other labels, area-weighted outside mean)."""
    props = np.flatnonzero(ps.table["layer"] == j)
    internal = np.zeros(len(props))
    cross = np.zeros(len(props))
    outside_sum = np.zeros(len(props))
    if len(props) == 0 or len(st.edges) == 0:
        return props, internal, np.zeros(len(props))
    a, b = st.edges[:, 0], st.edges[:, 1]
    w = st.edge_area
    means = st.means()
    wa, wb = w * means[a], w * means[b]
    step = max(1, chunk_elems // max(len(a), 1))
    for c0 in range(0, len(props), step):
        pc = props[c0 : c0 + step]
        single = np.diff(ps.indptr)[pc] == 1
        r0 = ps.indptr[pc]
        s, e = ps.starts[r0][:, None], ps.stops[r0][:, None]
        in_a = (a[None] >= s) & (a[None] < e)
        in_b = (b[None] >= s) & (b[None] < e)
        for k in np.flatnonzero(~single):  # multi-interval proposals: OR the rest in
            p = pc[k]
            for r in range(ps.indptr[p] + 1, ps.indptr[p + 1]):
                s1, e1 = ps.starts[r], ps.stops[r]
                in_a[k] |= (a >= s1) & (a < e1)
                in_b[k] |= (b >= s1) & (b < e1)
        both = in_a & in_b
        ca = in_a & ~in_b  # edge leaves through b
        cb = in_b & ~in_a
        sl = slice(c0, c0 + len(pc))
        internal[sl] = both @ w
        cross[sl] = ca @ w + cb @ w
        outside_sum[sl] = ca @ wb + cb @ wa
    return props, internal, np.where(cross > 0, outside_sum / np.maximum(cross, 1e-12), np.nan)


def compute_features(
    ps: ProposalSet,
    image: np.ndarray | None,
    body: np.ndarray | None,
    spacing=(1.0, 1.0, 1.0),
    stats: dict[str, LayerStats] | None = None,
) -> ProposalSet:
    """Fill voxels, bbox, centroid, compactness and contrast columns (in place; returns ps).

    compactness = sphericity pi^(1/3) (6V)^(2/3) / A in mm (1 for a ball, ~0.5 for
    a thin plate); contrast = mean inside minus the boundary-area-weighted mean of
    the neighbouring labels (the surroundings), in image units.
    """
    if stats is None:
        stats = {n: layer_stats(ps.layers[n], image, body, spacing) for n in ps.layer_names}
    base = basic_stats(ps, stats)
    n = ps.count
    area = np.zeros(n)
    outside = np.full(n, np.nan)
    for j, name in enumerate(ps.layer_names):
        st = stats[name]
        props, internal, out_mean = _edge_features(ps, j, st)
        tot = st.total_area()
        r_area = np.zeros(len(ps.starts))
        rows_mask = np.repeat(ps.table["layer"] == j, np.diff(ps.indptr))
        e = np.minimum(ps.stops[rows_mask], st.n_labels)
        r_area[rows_mask] = _interval_sums(tot, ps.starts[rows_mask], e)
        per = _per_proposal(ps, r_area)
        area[props] = per[props] - 2 * internal
        outside[props] = out_mean
    vol_mm = base["voxels"] * float(np.prod(spacing))
    comp = np.pi ** (1 / 3) * (6 * vol_mm) ** (2 / 3) / np.maximum(area, 1e-9)
    ps.table["voxels"] = base["voxels"]
    ps.table["bbox"] = base["bbox"]
    ps.table["centroid"] = base["centroid"]
    ps.table["compactness"] = np.clip(comp, 0, 1).astype(np.float32)
    contrast = base["intensity"] - np.nan_to_num(outside, nan=base["intensity"])
    ps.table["contrast"] = contrast.astype(np.float32)
    return ps
