"""Sizes follow the body: a small body gets as rich a set as a large one, at <= 200 B each."""

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.sampling import ProposalReader
from maskbank.bank.writing import write_proposals
from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.proposals.engine import ProposalConfig, generate_proposals
from maskbank.pipeline.proposals.scaling import scale_plan

MAX_BYTES_PER_PROPOSAL = 200


def test_plan_scales_with_body_volume():
    cfg = ProposalConfig()
    small = scale_plan(cfg, 60_000, (1.5, 1.5, 1.5), "mr")
    large = scale_plan(cfg, 3_000_000, (1.5, 1.5, 1.5), "ct")
    assert small.min_voxels == cfg.min_voxels  # the grid floor, not 500 mm^3
    assert large.min_voxels == int(np.ceil(cfg.min_body_fraction * 3_000_000))
    # leaves: the count follows the volume within the clamp, never below the floor
    lo, hi = cfg.leaf_count_range
    assert [t.n_leaves for t in small.trees] == [lo, lo, lo]
    assert [t.n_leaves for t in large.trees] == [hi, hi, hi]
    mid = scale_plan(cfg, 450_000, (1.5, 1.5, 1.5), "mr")
    assert [t.n_leaves for t in mid.trees] == [9000, 3000, 3000]
    # plain partitions: a segment count per body (same anatomy, any body size), each
    # size cut ``copies`` times from seed grids shifted against each other
    expected = [n for n, _, c in cfg.partitions for _ in range(c)]
    assert [p[0] for p in mid.partitions] == expected
    assert [p[0] for p in small.partitions] == expected
    offsets = [p[2] for p in mid.partitions if p[0] == cfg.partitions[0][0]]
    assert len(set(offsets)) == cfg.partitions[0][2] and offsets[0] == (0.5, 0.5, 0.5)
    assert all(0 <= v < 1 for o in offsets for v in o)
    tiny = scale_plan(cfg, 4_000, (1.5, 1.5, 1.5), "mr")  # never below 8 voxels a segment
    assert max(p[0] for p in tiny.partitions) == 4_000 // 8
    # coarse partitions flood a 2x grid; fine ones keep the body's own factor
    for n, _, _, factor in mid.partitions:
        assert factor == (2 if 450_000 / n >= cfg.coarse_flood_voxels else 1)
    assert small.split_distance_mm < large.split_distance_mm
    assert small.split_min_voxels < large.split_min_voxels
    # explicit legacy options still win
    legacy = scale_plan(ProposalConfig(scales=(800,), min_volume_mm3={"ct": 500.0}), 60_000,
                        (1.5, 1.5, 1.5), "ct")  # fmt: skip
    assert legacy.min_voxels == 149 and [t.n_leaves for t in legacy.trees] == [800]


def _stored_bytes(ps, ph, tmp_path, name) -> int:
    bank = Bank.create(tmp_path / name)
    bank.write_scan("s", {"image": ph.image, "body": ph.body}, {"spacing": list(ph.spacing)})
    write_proposals(bank, "s", ps)
    pr = ProposalReader(bank.scan("s"))
    i = int(np.argmax(pr.table["voxels"]))
    assert pr.mask(i).sum() == pr.table["voxels"][i]  # exact rebuild from the bank
    return pr.nbytes_stored()


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_small_body_gets_a_comparable_set(modality, tmp_path):
    large = make_phantom(modality, shape=(80, 80, 64), spacing=(1.5, 1.5, 1.5), seed=0)
    small = make_phantom(modality, shape=(40, 40, 32), spacing=(1.5, 1.5, 1.5), seed=0)
    assert small.body.sum() < large.body.sum() / 6
    counts = {}
    for name, ph in (("large", large), ("small", small)):
        ps = generate_proposals(ph.image, ph.body, ph.spacing, modality)
        counts[name] = ps.count
        nbytes = _stored_bytes(ps, ph, tmp_path, name)
        assert nbytes / ps.count <= MAX_BYTES_PER_PROPOSAL, (name, nbytes / ps.count)
    # an 8x smaller body (~25 k voxels) still gets thousands: leaves and minimum size
    # follow the grid, not a fixed number of millimetres
    assert counts["small"] >= 0.4 * counts["large"], counts
    assert counts["small"] >= 2000, counts


def test_cap_keeps_every_scale_and_the_most_stable():
    from maskbank.pipeline.proposals.filters import select_diverse

    rng = np.random.default_rng(0)
    voxels = np.round(np.exp(rng.uniform(np.log(20), np.log(200_000), 5000))).astype(np.int64)
    voxels[:3000] = rng.integers(20, 60, 3000)  # a flood of tiny fragments
    score = rng.normal(size=5000)
    ids = np.arange(5000)
    same_count = select_diverse(ids, voxels, score, 1000, size_prior=0.0)
    same_volume = select_diverse(ids, voxels, score, 1000, size_prior=1.0)
    for keep in (same_count, same_volume):
        assert len(keep) <= 1000 and len(np.unique(keep)) == len(keep)
        assert voxels[keep].max() > 50_000  # the large scales keep their share
    # tiny fragments do not crowd out the rest; with size_prior 1 even less so
    assert (voxels[same_volume] < 60).mean() < (voxels[same_count] < 60).mean() < 0.5
    # within a size range the most stable are the ones kept
    tiny = ids[voxels < 60]
    kept = np.intersect1d(tiny, same_count)
    dropped = np.setdiff1d(tiny, same_count)
    assert score[kept].mean() > score[dropped].mean() + 1
