"""ProposalSet format, external import, merging and features on small real arrays."""

import numpy as np
import pytest

from maskbank.pipeline.proposals import ProposalSet, merge_sets
from maskbank.pipeline.proposals.external import from_label_map, from_masks
from maskbank.pipeline.proposals.features import adjacency, compute_features


def _labels() -> np.ndarray:
    lm = np.zeros((20, 18, 16), np.uint16)
    lm[2:8, 2:8, 2:8] = 3  # cube of 216
    lm[10:18, 3:9, 4:12] = 7  # 384
    lm[12:14, 12:16, 1:3] = 9
    return lm


def test_from_label_map_one_proposal_per_value():
    lm = _labels()
    ps = from_label_map(lm, source="expert")
    assert ps.count == 3
    for i, v in enumerate([3, 7, 9]):
        np.testing.assert_array_equal(ps.mask(i), lm == v)
    assert set(ps.table["source"]) == {"expert"}


def test_from_label_map_split_components():
    lm = _labels()
    lm[15:18, 14:17, 12:15] = 3  # second component of label 3
    ps = from_label_map(lm, split_components=True)
    assert ps.count == 4
    assert sorted(int(ps.mask(i).sum()) for i in range(4)) == sorted([216, 27, 384, 16])


def test_from_label_map_rejects_bad_input():
    with pytest.raises(ValueError, match="3D"):
        from_label_map(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=">= 0"):
        from_label_map(-np.ones((3, 3, 3), np.int32))
    assert from_label_map(np.zeros((5, 5, 5), np.uint8)).count == 0


def test_from_masks_packs_overlapping_masks_into_layers():
    a = np.zeros((10, 10, 10), bool)
    a[1:6, 1:6, 1:6] = True
    b = np.zeros_like(a)
    b[4:9, 4:9, 4:9] = True  # overlaps a
    c = np.zeros_like(a)
    c[7:10, 0:2, 0:2] = True  # disjoint from a
    ps = from_masks([a, b, c])
    assert len(ps.layers) == 2
    for i, m in enumerate([a, b, c]):
        np.testing.assert_array_equal(ps.mask(i), m)


def test_merge_subset_and_prune_keep_masks():
    lm = _labels()
    p1 = from_label_map(lm, source="a")
    p2 = from_label_map((lm > 0).astype(np.uint8), source="a")  # same layer name -> renamed
    merged = merge_sets([p1, p2])
    assert merged.count == 4 and len(merged.layers) == 2
    np.testing.assert_array_equal(merged.mask(3), lm > 0)
    sub = merged.subset([3, 1])
    np.testing.assert_array_equal(sub.mask(0), lm > 0)
    np.testing.assert_array_equal(sub.mask(1), lm == 7)
    pruned = sub.prune_layers()
    for i in range(2):
        np.testing.assert_array_equal(pruned.mask(i), sub.mask(i))
    assert pruned.layers[pruned.layer_names[1]].max() == 1  # only label 7 kept, renumbered


def test_prune_merges_labels_no_interval_separates():
    rng = np.random.default_rng(0)
    lay = rng.integers(0, 41, size=(12, 10, 8)).astype(np.int32)
    starts = np.array([3, 3, 10, 30, 31])
    stops = np.array([9, 6, 20, 32, 41])
    ps = ProposalSet.from_intervals(lay.shape, "l", lay, starts, stops, "x")
    pruned = ps.prune_layers()
    for i in range(ps.count):
        np.testing.assert_array_equal(pruned.mask(i), ps.mask(i))
    # runs [3,6) [6,9) [10,20) [30,31) [31,32) [32,41) are used; [9,10) and [20,30) are not
    assert int(pruned.layers["l"].max()) == 6
    assert len(np.unique(pruned.layers["l"])) == 7


def test_validate_catches_inconsistency():
    with pytest.raises(ValueError):
        ProposalSet((4, 4, 4), {"x": np.zeros((4, 4, 4), np.int32)}, [0, 1], [0], [1], {})
    assert ProposalSet.empty((4, 4, 4)).count == 0


def test_features_match_direct_computation():
    rng = np.random.default_rng(0)
    lm = _labels()
    img = rng.normal(size=lm.shape).astype(np.float32) + (lm == 3) * 10
    body = np.ones(lm.shape, bool)
    ps = compute_features(from_label_map(lm), img, body, spacing=(1.0, 1.0, 2.0))
    m = lm == 3
    assert ps.table["voxels"][0] == m.sum()
    np.testing.assert_array_equal(ps.table["bbox"][0], [2, 2, 2, 8, 8, 8])
    np.testing.assert_allclose(ps.table["centroid"][0], np.argwhere(m).mean(0), rtol=1e-5)
    # inside mean ~10 vs neighbours ~0 -> contrast ~10
    assert 8 < ps.table["contrast"][0] < 12
    # 6x6x6 voxels of 1x1x2 mm: V = 432 mm^3, A = 2*(36 + 72 + 72) = 360 mm^2
    expected = np.pi ** (1 / 3) * (6 * 432) ** (2 / 3) / 360
    assert ps.table["compactness"][0] == pytest.approx(expected, rel=1e-4)


def test_adjacency_counts_shared_faces():
    lay = np.zeros((4, 2, 2), np.int32)
    lay[2:] = 1
    edges, area = adjacency(lay, spacing=(1.0, 2.0, 3.0))
    np.testing.assert_array_equal(edges, [[0, 1]])
    assert area[0] == pytest.approx(4 * 6.0)
