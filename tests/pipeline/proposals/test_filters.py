"""Proposal filters: exact near-duplicate search against decoded masks."""

import numpy as np

from maskbank.pipeline.proposals import ProposalSet, merge_sets
from maskbank.pipeline.proposals.features import compute_features
from maskbank.pipeline.proposals.filters import (
    _binned_block_sums,
    _block_sums,
    _joint_keys,
    _overlapping_pairs,
    duplicate_pairs,
    suppress_duplicates,
)

SHAPE = (24, 22, 20)


def _nested_set(seed: int) -> ProposalSet:
    """Three layers of blocky labels; proposals are single labels and label runs,
    some with two member intervals, so same- and cross-layer pairs both occur."""
    rng = np.random.default_rng(seed)
    sets = []
    for j in range(3):
        step = (3, 4, 5)[j]
        grid = np.indices(SHAPE)
        lay = (grid[0] // step) * 100 + (grid[1] // step) * 10 + grid[2] // (step + j)
        _, lay = np.unique(lay, return_inverse=True)
        lay = lay.reshape(SHAPE).astype(np.int32) + 1
        k = int(lay.max())
        starts = rng.integers(1, k, 60)
        stops = np.minimum(starts + rng.integers(1, 6, 60), k + 1)
        sets.append(ProposalSet.from_intervals(SHAPE, f"l{j}", lay, starts, stops, "test"))
    ps = merge_sets(sets)
    # two-interval members: join some proposal pairs of one layer
    indptr, s, e = [0], [], []
    for i in range(ps.count):
        ((a, b),) = ps.members(i)
        s.append(a)
        e.append(b)
        top = int(ps.layers[ps.layer_names[int(ps.table["layer"][i])]].max()) + 1
        if i % 7 == 0 and b + 5 <= top:
            s.append(b + 3)
            e.append(b + 5)
        indptr.append(len(s))
    ps = ProposalSet(
        ps.shape, ps.layers, np.array(indptr), np.array(s), np.array(e), ps.table, ps.layer_info
    )
    return compute_features(ps, None, None)


def test_duplicate_pairs_equal_brute_force_iou():
    for seed in range(3):
        ps = _nested_set(seed)
        masks = ps.masks(np.arange(ps.count)).reshape(ps.count, -1).astype(np.float64)
        inter = masks @ masks.T
        vox = masks.sum(1)
        iou = inter / (vox[:, None] + vox[None] - inter)
        ids = np.arange(ps.count)
        for t in (0.3, 0.6, 0.95):
            got = {tuple(sorted(p)) for p in duplicate_pairs(ps, vox, ps.table["bbox"], ids, t)}
            want = {(i, j) for i, j in zip(*np.nonzero(np.triu(iou > t, 1)), strict=True)}
            assert got == want and (t > 0.9 or want), (seed, t)


def test_both_contingency_routes_give_the_brute_force_block_sums():
    ps = _nested_set(2)
    a, b = ps.layers["l0"], ps.layers["l2"]
    rng = np.random.default_rng(0)
    r0 = rng.integers(1, a.max(), 40)
    c0 = rng.integers(1, b.max(), 40)
    rows, cols = (r0, r0 + rng.integers(1, 30, 40)), (c0, c0 + rng.integers(1, 30, 40))
    want = [
        int(((a >= x0) & (a < x1) & (b >= y0) & (b < y1)).sum())
        for x0, x1, y0, y1 in zip(*rows, *cols, strict=True)
    ]
    assert sum(want) > 0
    np.testing.assert_array_equal(_binned_block_sums(a, b, rows, cols), want)
    np.testing.assert_array_equal(_block_sums(_joint_keys(a, b), rows, cols, chunk=16), want)
    assert _binned_block_sums(a, b, rows, cols, max_cells=100) is None  # too many bounds


def test_candidate_pairs_do_not_depend_on_the_chunk_size():
    ps = _nested_set(1)
    vox, bbox, ids = ps.table["voxels"], ps.table["bbox"], np.arange(ps.count)
    whole = _overlapping_pairs(vox, bbox, ids, 0.3)
    assert len(whole[0]) > 50
    for chunk in (1, 7, 100):
        parts = _overlapping_pairs(vox, bbox, ids, 0.3, chunk=chunk)
        assert sorted(zip(*parts, strict=True)) == sorted(zip(*whole, strict=True))


def test_suppress_duplicates_keeps_one_of_each_pair():
    ps = _nested_set(5)
    dup = merge_sets([ps, ps.subset(np.arange(10))])  # ten exact copies
    dup = compute_features(dup, None, None)
    kept = suppress_duplicates(
        dup, dup.table["voxels"], dup.table["bbox"], np.arange(dup.count), 0.95
    )
    masks = dup.masks(kept).reshape(len(kept), -1)
    assert len({m.tobytes() for m in masks}) == len(kept)
    assert len(kept) <= ps.count
