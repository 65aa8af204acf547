"""Proposal filters: size, inside-body fraction, not-the-whole-body, near-duplicates, count cap.

The cap keeps a diverse set rather than the first proposals: equal shares of
log-size bins (structures come at every scale), the most stable proposals of
each bin first.

All work on per-label statistics and label-interval arithmetic; masks are
never decoded.  Duplicate search only compares proposals whose sizes are
within the IoU threshold of each other (IoU > t needs |a|/|b| > t) and whose
bounding boxes intersect.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from pipeline.proposals.proposal_set import ProposalSet


def basic_keep(
    voxels: np.ndarray,
    body_voxels: np.ndarray,
    body_total: int,
    min_voxels: int,
    min_inside: float = 0.9,
    max_body_fraction: float = 0.9,
) -> np.ndarray:
    """Boolean keep mask: big enough, mostly inside the body, not (nearly) the whole body."""
    v = np.maximum(voxels, 1)
    return (
        (voxels >= min_voxels)
        & (body_voxels / v >= min_inside)
        & (body_voxels <= max_body_fraction * max(body_total, 1))
    )


def _joint_counts(a: np.ndarray, b: np.ndarray) -> sparse.csr_matrix:
    """Contingency table of two label layers (rows: labels of a, cols: labels of b)."""
    na, nb = int(a.max(initial=0)) + 1, int(b.max(initial=0)) + 1
    key = a.reshape(-1).astype(np.int64) * nb + b.reshape(-1)
    uk, cnt = np.unique(key, return_counts=True)
    return sparse.csr_matrix((cnt, (uk // nb, uk % nb)), shape=(na, nb))


def duplicate_pairs(
    ps: ProposalSet, voxels: np.ndarray, bbox: np.ndarray, ids: np.ndarray, iou: float
) -> list[tuple[int, int]]:
    """Pairs (i, j) among ``ids`` whose mask IoU exceeds ``iou`` (exact)."""
    ids = np.asarray(ids)
    order = ids[np.argsort(voxels[ids], kind="stable")]
    v = voxels[order].astype(np.float64)
    top = np.searchsorted(v, v / iou, side="right")
    n_each = top - np.arange(len(v)) - 1
    ii = np.repeat(np.arange(len(v)), n_each)
    jj = ii + 1 + (np.arange(len(ii)) - np.repeat(np.cumsum(n_each) - n_each, n_each))
    p, q = order[ii], order[jj]
    bp, bq = bbox[p], bbox[q]
    touch = np.all((bp[:, :3] < bq[:, 3:]) & (bq[:, :3] < bp[:, 3:]), axis=1)
    p, q = p[touch], q[touch]
    layer = ps.table["layer"]
    counts = {
        j: np.bincount(ps.layers[n].reshape(-1).astype(np.intp))
        for j, n in enumerate(ps.layer_names)
    }
    prefix = {j: np.concatenate([[0], np.cumsum(c)]) for j, c in counts.items()}
    joints: dict[tuple[int, int], sparse.csr_matrix] = {}
    out = []
    for a, b in zip(p.tolist(), q.tolist(), strict=True):
        la, lb = int(layer[a]), int(layer[b])
        inter = 0
        for s1, e1 in ps.members(a):
            for s2, e2 in ps.members(b):
                if la == lb:
                    s, e = max(s1, s2), min(e1, e2, len(counts[la]))
                    inter += int(prefix[la][e] - prefix[la][s]) if e > s else 0
                else:
                    key = (la, lb)
                    if key not in joints:
                        joints[key] = _joint_counts(
                            ps.layers[ps.layer_names[la]], ps.layers[ps.layer_names[lb]]
                        )
                    jm = joints[key]
                    inter += int(jm[s1:e1, s2:e2].sum())
        union = voxels[a] + voxels[b] - inter
        if union > 0 and inter / union > iou:
            out.append((a, b))
    return out


def suppress_duplicates(
    ps: ProposalSet,
    voxels: np.ndarray,
    bbox: np.ndarray,
    ids: np.ndarray,
    iou: float = 0.95,
    priority: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy: walk ``ids`` by priority (lower first), drop any whose IoU with a kept one > iou."""
    ids = np.asarray(ids, np.int64)
    if len(ids) < 2:
        return ids
    pairs = duplicate_pairs(ps, voxels, bbox, ids, iou)
    nbrs: dict[int, list[int]] = {}
    for a, b in pairs:
        nbrs.setdefault(a, []).append(b)
        nbrs.setdefault(b, []).append(a)
    walk = ids if priority is None else ids[np.argsort(priority[ids], kind="stable")]
    dropped: set[int] = set()
    keep = []
    for i in walk.tolist():
        if i in dropped:
            continue
        keep.append(i)
        dropped.update(nbrs.get(i, ()))
    return np.sort(np.asarray(keep, np.int64))


def cap_count(ids: np.ndarray, sources: np.ndarray, voxels: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` ids, quota per source proportional to its count, spread over sizes."""
    ids = np.asarray(ids, np.int64)
    if len(ids) <= limit:
        return ids
    keep = []
    names, counts = np.unique(sources[ids], return_counts=True)
    quotas = np.floor(counts / counts.sum() * limit).astype(int)
    quotas[np.argmax(counts)] += limit - quotas.sum()
    for name, quota in zip(names, quotas, strict=True):
        sel = ids[sources[ids] == name]
        sel = sel[np.argsort(voxels[sel], kind="stable")]
        pick = np.unique(np.linspace(0, len(sel) - 1, quota).round().astype(int))
        keep.append(sel[pick])
    return np.sort(np.concatenate(keep))


def _water_fill(counts: np.ndarray, limit: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Shares of ``limit`` over bins in proportion to ``weights`` (equal by default);
    what a bin cannot use goes to the others."""
    w = np.ones(len(counts)) if weights is None else np.asarray(weights, float)
    quota = np.zeros(len(counts))
    active = counts > 0
    while active.any():
        left = limit - quota.sum()
        if left < 0.5:
            break
        quota[active] += left * w[active] / w[active].sum()
        quota = np.minimum(quota, counts)
        active = quota < counts
    return np.floor(quota).astype(np.int64)


def select_diverse(
    ids: np.ndarray,
    voxels: np.ndarray,
    score: np.ndarray,
    limit: int,
    n_bins: int = 16,
    size_prior: float = 0.0,
) -> np.ndarray:
    """At most ``limit`` ids: quotas over log-size bins, highest ``score`` first in each.

    Bin quotas are proportional to (bin's size)^size_prior: 0 gives every scale the
    same share, a negative value favours small proposals (anatomy has more small
    structures than large ones).  Sorted ids.  Size bins span the candidates' own
    size range, so the rule is the same for a macaque brain and an adult torso.
    """
    ids = np.asarray(ids, np.int64)
    if len(ids) <= limit:
        return np.sort(ids)
    logv = np.log(np.maximum(voxels[ids], 1).astype(np.float64))
    edges = np.linspace(logv.min(), logv.max() + 1e-9, n_bins + 1)
    bins = np.clip(np.digitize(logv, edges) - 1, 0, n_bins - 1)
    centres = np.exp((edges[:-1] + edges[1:]) / 2)
    weights = (centres / centres[0]) ** size_prior
    quota = _water_fill(np.bincount(bins, minlength=n_bins), limit, weights)
    keep = []
    for b in np.flatnonzero(quota):
        sel = ids[bins == b]
        keep.append(sel[np.argsort(-score[sel], kind="stable")[: quota[b]]])
    return np.sort(np.concatenate(keep))
