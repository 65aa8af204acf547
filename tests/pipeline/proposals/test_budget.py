"""The per-scan byte budget: the costliest layers go until the set fits."""

import numpy as np

from maskbank.bank.writing import proposal_nbytes
from maskbank.pipeline.proposals import ProposalSet, merge_sets
from maskbank.pipeline.proposals.budget import fit_byte_budget
from maskbank.pipeline.proposals.external import from_label_map
from maskbank.pipeline.proposals.features import compute_features

SHAPE = (48, 48, 40)


def _set():
    """Cheap layers (smooth blocks at two scales) and a costly one: 2-voxel cubes in
    random order, whose ragged cuts cost far more bytes per proposal."""
    grid = np.indices(SHAPE)
    blocks = (grid[0] // 6) * 100 + (grid[1] // 6) * 10 + grid[2] // 5 + 1
    slabs = (grid[0] // 3) * 100 + (grid[1] // 12) * 10 + grid[2] // 10 + 1
    cubes = (grid[0] // 2) * 10_000 + (grid[1] // 2) * 100 + grid[2] // 2
    _, cubes = np.unique(cubes, return_inverse=True)
    cubes = np.random.default_rng(0).permutation(int(cubes.max()) + 1)[cubes]
    cubes = cubes.reshape(SHAPE).astype(np.int32) + 1
    runs = np.arange(1, int(cubes.max()) - 32, 32)
    ragged = ProposalSet.from_intervals(SHAPE, "ragged", cubes, runs, runs + 32, "ragged")
    sets = [from_label_map(blocks, "blocks"), from_label_map(slabs, "slabs"), ragged]
    return compute_features(merge_sets(sets), None, None)


def _bytes_per_proposal(ps) -> float:
    return sum(proposal_nbytes(ps).values()) / ps.count


def test_an_over_budget_set_loses_its_costliest_layer_and_fits():
    ps = _set()
    nbytes = proposal_nbytes(ps)
    carried = {n: int((ps.table["source"] == n).sum()) for n in ("blocks", "slabs", "ragged")}
    cost = {n: nbytes[n] / carried[n] for n in carried}
    assert cost["ragged"] > 3 * max(cost["blocks"], cost["slabs"])
    budget = 0.6 * _bytes_per_proposal(ps)  # the metadata (~20 kB here) stays: not 0.5
    out, report = fit_byte_budget(ps, proposal_nbytes, budget)
    assert report["fits"] and _bytes_per_proposal(out) <= budget
    assert report["dropped_layers"] == ["ragged"]
    assert report["dropped"] == carried["ragged"] == ps.count - out.count
    assert report["bytes_per_proposal"] == round(_bytes_per_proposal(out), 1)
    # every kept proposal is one of the originals, mask for mask
    orig = {ps.mask(i).tobytes() for i in range(ps.count)}
    assert all(out.mask(i).tobytes() in orig for i in range(out.count))


def test_a_set_within_budget_or_no_budget_is_untouched():
    ps = _set()
    per = _bytes_per_proposal(ps)
    for budget in (per * 1.01, 0):
        out, report = fit_byte_budget(ps, proposal_nbytes, budget)
        assert out is ps and report["dropped"] == 0 and report["fits"]


def test_an_impossible_budget_ends_at_the_cheapest_set_it_can_reach():
    ps = _set()
    out, report = fit_byte_budget(ps, proposal_nbytes, 1.0)
    assert not report["fits"] and 0 < out.count < ps.count
    assert report["bytes_per_proposal"] < _bytes_per_proposal(ps)
    # imported masks (like intensity windows) are never dropped, whatever they cost
    assert set(out.table["source"]) == {"blocks", "slabs"}
