"""Proposal filters: size, inside-body fraction, not-the-whole-body, near-duplicates, count cap.

The cap keeps a diverse set rather than the first proposals: shares of
log-size bins (structures come at every scale), the most stable proposals of
each bin first.

All work on per-label statistics and label-interval arithmetic; masks are
never decoded.  Duplicate search only compares proposals whose sizes are
within the IoU threshold of each other (IoU > t needs |a|/|b| > t) and whose
bounding boxes overlap by more than t x the larger size (a ∩ b lies in the
boxes' intersection).
"""

from __future__ import annotations

import numpy as np

from maskbank.pipeline.proposals.proposal_set import ProposalSet


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


def _joint_keys(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """Contingency table of two label layers as the sorted keys ``row * nb + col`` of
    their voxels (rows: labels of a, cols: labels of b): the number of voxels in
    rows < r, or in row r with cols < c, is a binary search.  Label 0 belongs to no
    proposal, so only voxels labelled in both layers are kept."""
    nb = int(b.max(initial=0)) + 1
    both = (a != 0) & (b != 0)
    key = a[both].astype(np.int64) * nb + b[both]
    key.sort()
    return key, nb


def _binned_block_sums(
    a: np.ndarray,
    b: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray],
    cols: tuple[np.ndarray, np.ndarray],
    max_cells: int = 1 << 22,
) -> np.ndarray | None:
    """Block sums of the contingency table of layers a (rows) and b (cols), from a table
    of only the label ranges the blocks' bounds cut out: one bincount over the voxels
    and a summed-area table, no sort.  None when that table would exceed ``max_cells``.

    Blocks start at label >= 1, so label 0 (no label) falls in a bin no block covers.
    """
    (r0, r1), (c0, c1) = rows, cols
    rcut, ccut = np.unique(np.concatenate([r0, r1])), np.unique(np.concatenate([c0, c1]))
    nr, nc = len(rcut) + 1, len(ccut) + 1
    if nr * nc > max_cells:
        return None
    dtype = np.int32 if nr * nc < 2**31 else np.int64
    lut_a = np.searchsorted(rcut, np.arange(int(a.max(initial=0)) + 1), side="right") * nc
    lut_b = np.searchsorted(ccut, np.arange(int(b.max(initial=0)) + 1), side="right")
    key = lut_a.astype(dtype)[a.reshape(-1)] + lut_b.astype(dtype)[b.reshape(-1)]
    table = np.bincount(key, minlength=nr * nc).reshape(nr, nc)
    sat = np.zeros((nr + 1, nc + 1), np.int64)
    sat[1:, 1:] = table.cumsum(0).cumsum(1)
    i0, i1 = np.searchsorted(rcut, r0) + 1, np.searchsorted(rcut, r1) + 1
    j0, j1 = np.searchsorted(ccut, c0) + 1, np.searchsorted(ccut, c1) + 1
    return sat[i1, j1] - sat[i0, j1] - sat[i1, j0] + sat[i0, j0]


def _expand(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(entry index, value) for every integer in each ``[start, stop)``."""
    n = np.maximum(stops - starts, 0)
    owner = np.repeat(np.arange(len(n)), n)
    first = np.cumsum(n) - n
    return owner, starts[owner] + (np.arange(int(n.sum())) - first[owner])


def _block_sums(
    joint: tuple[np.ndarray, int],
    rows: tuple[np.ndarray, np.ndarray],
    cols: tuple[np.ndarray, np.ndarray],
    chunk: int = 1 << 21,
) -> np.ndarray:
    """Sum of the contingency table over rows [r0, r1) x cols [c0, c1), per block."""
    keys, nb = joint
    (r0, r1), (c0, c1) = rows, cols
    c0, c1 = np.minimum(c0, nb), np.minimum(c1, nb)  # a bound past b's labels: not the next row
    out = np.zeros(len(r0), np.int64)
    cum = np.cumsum(np.maximum(r1 - r0, 0))
    if len(cum) == 0:
        return out
    cuts = np.searchsorted(cum, np.arange(chunk, cum[-1], chunk), side="right")
    edges = np.unique(np.concatenate([[0], cuts, [len(r0)]]))
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):  # ~chunk rows each
        owner, r = _expand(r0[lo:hi], r1[lo:hi])
        owner += lo
        base = r * nb
        inside = np.searchsorted(keys, base + c1[owner])
        inside -= np.searchsorted(keys, base + c0[owner])
        out += np.bincount(owner, weights=inside, minlength=len(r0)).astype(np.int64)
    return out


def _overlapping_pairs(
    voxels: np.ndarray, bbox: np.ndarray, ids: np.ndarray, iou: float, chunk: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs among ``ids`` that can have IoU > ``iou``: sizes within the ratio, and boxes
    overlapping by more than ``iou`` x the larger size.  Size pairs are walked in chunks
    of ``chunk``: 50,000 candidates make millions of them (a few hundred MB at once)."""
    order = ids[np.argsort(voxels[ids], kind="stable")]
    v = voxels[order].astype(np.float64)
    n_each = np.searchsorted(v, v / iou, side="right") - np.arange(len(v)) - 1
    cum = np.cumsum(n_each)
    if len(cum) == 0 or cum[-1] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cuts = np.searchsorted(cum, np.arange(chunk, cum[-1], chunk), side="right")
    edges = np.unique(np.concatenate([[0], cuts, [len(v)]]))
    ps, qs = [], []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        first = np.arange(lo, hi) + 1  # partners of i: the next n_each[i] in size order
        i, k = _expand(first, first + n_each[lo:hi])
        p, q = order[lo + i], order[k]
        bp, bq = bbox[p], bbox[q]
        ext = np.minimum(bp[:, 3:], bq[:, 3:]) - np.maximum(bp[:, :3], bq[:, :3])
        box = np.prod(np.clip(ext, 0, None), axis=1)
        # IoU > t needs |a ∩ b| > t max(|a|, |b|), and a ∩ b lies in the boxes' intersection
        near = box > iou * np.maximum(voxels[p], voxels[q])
        ps.append(p[near])
        qs.append(q[near])
    return np.concatenate(ps), np.concatenate(qs)


def duplicate_pairs(
    ps: ProposalSet, voxels: np.ndarray, bbox: np.ndarray, ids: np.ndarray, iou: float
) -> list[tuple[int, int]]:
    """Pairs (i, j) among ``ids`` whose mask IoU exceeds ``iou`` (exact).

    Candidates are pairs of similar size whose boxes overlap enough; their intersections
    come from label-interval arithmetic: prefix sums of label counts within a
    layer, and range sums of the two layers' contingency table across layers
    (summed over the shorter of the two label intervals), all vectorised.
    """
    p, q = _overlapping_pairs(voxels, bbox, np.asarray(ids), iou)
    if len(p) == 0:
        return []
    layer = np.asarray(ps.table["layer"], np.int64)
    indptr = np.asarray(ps.indptr, np.int64)
    starts, stops = np.asarray(ps.starts, np.int64), np.asarray(ps.stops, np.int64)
    # every (member interval of p) x (member interval of q), tagged with its pair
    pair, m_a = _expand(indptr[p], indptr[p + 1])
    o, m_b = _expand(indptr[q[pair]], indptr[q[pair] + 1])
    pair, m_a = pair[o], m_a[o]
    s1, e1, s2, e2 = starts[m_a], stops[m_a], starts[m_b], stops[m_b]
    la, lb = layer[p][pair], layer[q][pair]
    inter = np.zeros(len(p), np.int64)
    same = la == lb
    if same.any():
        counts = [np.bincount(ps.layers[n].reshape(-1).astype(np.intp)) for n in ps.layer_names]
        offs = np.concatenate([[0], np.cumsum([len(c) + 1 for c in counts])])
        prefix = np.concatenate([np.concatenate([[0], np.cumsum(c)]) for c in counts])
        sizes = np.array([len(c) for c in counts], np.int64)
        lay = la[same]
        s = np.maximum(s1[same], s2[same])
        e = np.minimum(np.minimum(e1[same], e2[same]), sizes[lay])
        e = np.maximum(e, s)
        inter += np.bincount(
            pair[same], weights=prefix[offs[lay] + e] - prefix[offs[lay] + s], minlength=len(p)
        ).astype(np.int64)
    cross = np.flatnonzero(~same)
    if len(cross):
        swap = (e1[cross] - s1[cross]) > (e2[cross] - s2[cross])  # sum over the shorter side
        ka = np.where(swap, lb[cross], la[cross])
        kb = np.where(swap, la[cross], lb[cross])
        r0 = np.where(swap, s2[cross], s1[cross])
        r1 = np.where(swap, e2[cross], e1[cross])
        c0 = np.where(swap, s1[cross], s2[cross])
        c1 = np.where(swap, e1[cross], e2[cross])
        group = ka * len(ps.layer_names) + kb
        for g in np.unique(group):
            sel = np.flatnonzero(group == g)
            a_name = ps.layer_names[int(ka[sel[0]])]
            b_name = ps.layer_names[int(kb[sel[0]])]
            # every voxel the group's blocks count lies in the union of its proposals' boxes
            owners = np.concatenate([p[pair[cross[sel]]], q[pair[cross[sel]]]])
            lo, hi = bbox[owners, :3].min(0), bbox[owners, 3:].max(0)
            box = tuple(slice(int(x0), int(x1)) for x0, x1 in zip(lo, hi, strict=True))
            la_, lb_ = ps.layers[a_name][box], ps.layers[b_name][box]
            rows, cols = (r0[sel], r1[sel]), (c0[sel], c1[sel])
            sums = _binned_block_sums(la_, lb_, rows, cols)
            if sums is None:  # too many distinct bounds: the sorted-keys route
                sums = _block_sums(_joint_keys(la_, lb_), rows, cols)
            inter += np.bincount(pair[cross[sel]], weights=sums, minlength=len(p)).astype(np.int64)
    union = voxels[p] + voxels[q] - inter
    hit = (union > 0) & (inter > iou * np.maximum(union, 1))
    return list(zip(p[hit].tolist(), q[hit].tolist(), strict=True))


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
