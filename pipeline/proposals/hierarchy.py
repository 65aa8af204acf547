"""Hierarchical merging over the supervoxel region adjacency graph (RAG).

The RAG is built with vectorised numpy (bincounts over label pairs of
neighbouring voxels; no per-voxel Python) and held as a torch-geometric
``Data``: nodes = supervoxels (mean, std, log size, centroid), edges =
adjacency (shared area, boundary strength).  Agglomerative merging then joins
the cheapest adjacent pair until one region per connected component is left.
Every merge creates a tree node; leaves are renumbered in depth-first order so
each node is one contiguous label interval, i.e. one proposal at zero extra
storage.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch
from torch_geometric.data import Data

from pipeline.proposals.features import LayerStats, adjacency, layer_stats


@dataclass
class MergeTree:
    """Binary merge forest over ``n_leaves`` leaves (ids 0..n-1); node n+k = k-th merge."""

    n_leaves: int
    children: np.ndarray  # (n_merges, 2) node ids
    cost: np.ndarray  # (n_merges,) merge cost

    def leaf_order_and_intervals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rank of each leaf in DFS order, interval [lo, hi) and height per merge node)."""
        n, m = self.n_leaves, len(self.children)
        lo = np.zeros(n + m, np.int64)
        hi = np.zeros(n + m, np.int64)
        height = np.zeros(n + m, np.int64)
        rank = np.zeros(n, np.int64)
        is_child = np.zeros(n + m, bool)
        if m:
            is_child[self.children.ravel()] = True
        roots = np.flatnonzero(~is_child)
        pos = 0
        for root in roots.tolist():
            stack = [(root, False)]
            while stack:
                node, done = stack.pop()
                if node < n:
                    rank[node] = pos
                    lo[node], hi[node] = pos, pos + 1
                    pos += 1
                elif done:
                    a, b = self.children[node - n]
                    lo[node], hi[node] = lo[a], hi[b]
                    height[node] = 1 + max(height[a], height[b])
                else:
                    a, b = self.children[node - n]
                    stack += [(node, True), (int(b), False), (int(a), False)]
        return rank, lo[n:], hi[n:], height[n:]

    def stability(self) -> tuple[np.ndarray, np.ndarray]:
        """(per leaf, per merge node) log of parent merge cost over the node's own.

        A node that forms cheaply and survives long before its next merge is a
        region the image supports (the lifetime criterion of hierarchical
        segmentation); leaves count their own cost as the median first merge
        cost.  Roots (never merged again) get the largest value.
        """
        n, m = self.n_leaves, len(self.children)
        own = np.zeros(n + m)
        own[n:] = self.cost
        floor = max(float(np.median(self.cost)) if m else 1.0, 1e-12) * 1e-3
        own[:n] = float(np.median(self.cost)) if m else 1.0
        parent_cost = np.full(n + m, np.inf)
        if m:
            parent_cost[self.children[:, 0]] = self.cost
            parent_cost[self.children[:, 1]] = self.cost
        life = np.log(np.maximum(parent_cost, floor) / np.maximum(own, floor))
        finite = np.isfinite(life)
        life[~finite] = life[finite].max(initial=0.0) + 1.0
        return life[:n], life[n:]


def build_rag(
    labels: np.ndarray, image: np.ndarray, gradient: np.ndarray, spacing
) -> tuple[Data, LayerStats]:
    """Region adjacency graph of a label map (label 0 = outside, excluded) as a pyg ``Data``."""
    edges, area, faces, gsum = adjacency(labels, spacing, weight=gradient)
    st = layer_stats(labels, image, None, spacing, edges=(edges, area))
    n = st.n_labels
    sq = np.bincount(
        labels.reshape(-1), weights=image.reshape(-1).astype(np.float64) ** 2, minlength=n
    )
    cnt = np.maximum(st.counts, 1)
    mean = st.sums / cnt
    std = np.sqrt(np.maximum(sq / cnt - mean**2, 0))
    x = np.stack([mean, std, np.log1p(st.counts), *(st.coord_sums / cnt[:, None]).T], axis=1)
    keep = (edges[:, 0] > 0) & (edges[:, 1] > 0)
    e = edges[keep]
    ei = np.concatenate([e, e[:, ::-1]]).T
    attr = np.stack([area[keep], faces[keep], gsum[keep]], axis=1)
    data = Data(
        x=torch.from_numpy(x[1:].astype(np.float32)),  # node i = label i + 1
        edge_index=torch.from_numpy(ei - 1),
        edge_attr=torch.from_numpy(np.concatenate([attr, attr]).astype(np.float32)),
        counts=torch.from_numpy(st.counts[1:]),
        sums=torch.from_numpy(st.sums[1:]),
        spacing=tuple(float(v) for v in spacing),
    )
    return data, st


def agglomerate(
    data: Data,
    intensity_scale: float,
    gradient_scale: float,
    boundary_weight: float = 1.0,
    size_exponent: float = 0.5,
    spatial_weight: float = 0.0,
    spatial_scale: float = 1.0,
) -> MergeTree:
    """Greedy agglomeration over the RAG; every merge is a tree node.

    cost = (|mean_a - mean_b|/s_i + w_b * boundary/s_g + w_s * |centroid_a - centroid_b|/s_x)
    * (harmonic size / median size)^size_exponent.  The size factor (Ward-like)
    lets small fragments merge first, which keeps the tree balanced; the
    spatial term keeps merged regions compact, so nodes also approximate
    structures whose borders the image barely shows.  Means, centroids and
    boundary strengths of merged regions are exact (sums are carried).
    """
    n = int(data.num_nodes)
    counts = data.counts.numpy().astype(np.float64).tolist()
    sums = data.sums.numpy().astype(np.float64).tolist()
    cents = data.x.numpy()[:, 3:6].astype(np.float64) * np.asarray(data.spacing, np.float64)
    csum = (cents * np.asarray(counts)[:, None]).tolist() if n else []
    ei = data.edge_index.numpy()
    attr = data.edge_attr.numpy().astype(np.float64)
    half = ei.shape[1] // 2
    nbrs: list[dict[int, list[float]]] = [dict() for _ in range(n)]
    for (a, b), (_, f, g) in zip(ei[:, :half].T.tolist(), attr[:half].tolist(), strict=True):
        nbrs[a][b] = [f, g]
        nbrs[b][a] = [f, g]
    alive = [True] * n
    si = max(intensity_scale, 1e-9)
    sg = max(gradient_scale, 1e-9)
    ref = float(np.median(counts)) if counts else 1.0
    sx = max(spatial_scale, 1e-9)

    def cost(a: int, b: int, fg: list[float]) -> float:
        na, nb = counts[a], counts[b]
        d = abs(sums[a] / na - sums[b] / nb) / si + boundary_weight * (fg[1] / fg[0]) / sg
        if spatial_weight:
            ca, cb = csum[a], csum[b]
            dx = (ca[0] / na - cb[0] / nb, ca[1] / na - cb[1] / nb, ca[2] / na - cb[2] / nb)
            d += spatial_weight * (dx[0] ** 2 + dx[1] ** 2 + dx[2] ** 2) ** 0.5 / sx
        return d * ((na * nb / (na + nb)) / ref) ** size_exponent

    heap = [(cost(a, b, fg), a, b) for a in range(n) for b, fg in nbrs[a].items() if a < b]
    heapq.heapify(heap)
    children: list[tuple[int, int]] = []
    costs: list[float] = []
    while heap:
        c, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]) or b not in nbrs[a]:
            continue
        new = len(counts)
        children.append((a, b))
        costs.append(c)
        alive[a] = alive[b] = False
        counts.append(counts[a] + counts[b])
        sums.append(sums[a] + sums[b])
        if spatial_weight:
            csum.append([csum[a][i] + csum[b][i] for i in range(3)])
        alive.append(True)
        merged: dict[int, list[float]] = {}
        for old in (a, b):
            for k, fg in nbrs[old].items():
                if k in (a, b):
                    continue
                acc = merged.setdefault(k, [0.0, 0.0])
                acc[0] += fg[0]
                acc[1] += fg[1]
                del nbrs[k][old]
            nbrs[old] = {}
        nbrs.append(merged)
        for k, fg in merged.items():
            nbrs[k][new] = fg
            heapq.heappush(heap, (cost(k, new, fg), k, new))
    return MergeTree(
        n,
        np.asarray(children, np.int64).reshape(-1, 2),
        np.asarray(costs, np.float64),
    )


def hierarchy_layer(
    labels: np.ndarray,
    n_labels: int,
    image: np.ndarray,
    gradient: np.ndarray,
    spacing,
    boundary_weight: float = 1.0,
    size_exponent: float = 0.5,
    spatial_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, LayerStats, np.ndarray, np.ndarray]:
    """One interval per merge node: (relabelled layer, starts, stops, heights, its stats,
    stability of each leaf in label order, stability of each merge node)."""
    data, st = build_rag(labels, image, gradient, spacing)
    x = data.x.numpy()
    gb = data.edge_attr.numpy()
    ei = data.edge_index.numpy()
    # robust scales: a typical edge scores ~1 on each term, whatever the modality
    si = float(np.median(np.abs(x[ei[0], 0] - x[ei[1], 0]))) if ei.size else 1.0
    sg = float(np.median(gb[:, 2] / np.maximum(gb[:, 1], 1))) if len(gb) else 1.0
    sx = 1.0
    if ei.size and spatial_weight:
        cm = x[:, 3:6] * np.asarray(spacing)
        sx = float(np.median(np.linalg.norm(cm[ei[0]] - cm[ei[1]], axis=1)))
    tree = agglomerate(data, si, sg, boundary_weight, size_exponent, spatial_weight, sx)
    rank, lo, hi, height = tree.leaf_order_and_intervals()
    leaf_life, node_life = tree.stability()
    lut = np.zeros(n_labels + 1, np.int64)
    lut[1:] = rank + 1
    dtype = np.uint16 if n_labels < 65535 else np.int32
    life = np.zeros(n_labels)
    life[rank] = leaf_life  # leaves in layer-label order
    return lut.astype(dtype)[labels], lo + 1, hi + 1, height, st.relabel(lut), life, node_life
