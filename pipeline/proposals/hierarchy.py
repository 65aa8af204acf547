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

from dataclasses import dataclass

import numpy as np
import torch
from torch_geometric.data import Data

from maskbank.pipeline.proposals.features import LayerStats, adjacency, layer_stats
from maskbank.pipeline.proposals.merge_kernel import agglomerate_loop


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
    counts = data.counts.numpy().astype(np.float64)
    sums = data.sums.numpy().astype(np.float64)
    cents = data.x.numpy()[:, 3:6].astype(np.float64) * np.asarray(data.spacing, np.float64)
    ei = data.edge_index.numpy().astype(np.int64)
    attr = data.edge_attr.numpy().astype(np.float64)
    half = ei.shape[1] // 2
    children, costs = agglomerate_loop(
        n,
        np.ascontiguousarray(ei[0, :half]),
        np.ascontiguousarray(ei[1, :half]),
        np.ascontiguousarray(attr[:half, 1]),
        np.ascontiguousarray(attr[:half, 2]),
        counts,
        sums,
        np.ascontiguousarray(cents * counts[:, None]),
        np.array(
            [
                max(intensity_scale, 1e-9),
                max(gradient_scale, 1e-9),
                max(spatial_scale, 1e-9),
                float(np.median(counts)) if n else 1.0,
                boundary_weight,
                size_exponent,
                spatial_weight,
            ],
            np.float64,
        ),
    )
    return MergeTree(n, children.reshape(-1, 2), costs)


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
