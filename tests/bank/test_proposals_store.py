"""Proposals in the bank: exact round trip, ROI rebuilding, voxel counts, clear errors."""

import numpy as np
import pytest

from maskbank.bank import Bank, NoProposalsError
from maskbank.bank.sampling import ProposalReader
from maskbank.bank.writing import proposal_nbytes, write_proposals
from maskbank.pipeline.proposals import merge_sets
from maskbank.pipeline.proposals.external import from_label_map, from_masks
from maskbank.pipeline.proposals.features import compute_features

SHAPE = (40, 36, 30)


def _bank_with_scan(tmp_path):
    bank = Bank.create(tmp_path / "bank")
    rng = np.random.default_rng(1)
    img = rng.normal(size=SHAPE).astype(np.float32)
    body = np.ones(SHAPE, bool)
    bank.write_scan("s1", {"image": img, "body": body}, {"spacing": [1.5, 1.5, 1.5]})
    return bank, img, body


def _proposals(img, body):
    rng = np.random.default_rng(2)
    lm = np.zeros(SHAPE, np.int32)
    for v in range(1, 30):
        c = rng.integers(0, np.array(SHAPE) - 6)
        lm[c[0] : c[0] + 6, c[1] : c[1] + 5, c[2] : c[2] + 4] = v * 3
    m1 = np.zeros(SHAPE, bool)
    m1[5:30, 5:25, 3:20] = True
    m2 = np.zeros(SHAPE, bool)
    m2[20:38, 10:34, 10:28] = True  # overlaps m1 -> second layer
    ps = merge_sets([from_label_map(lm, "expert"), from_masks([m1, m2], "sam")])
    return compute_features(ps, img, body, (1.5, 1.5, 1.5))


def _features(ps):
    return compute_features(ps, None, None)


def test_round_trip_is_exact(tmp_path):
    bank, img, body = _bank_with_scan(tmp_path)
    ps = _proposals(img, body)
    write_proposals(bank, "s1", ps)
    pr = ProposalReader(Bank.open(tmp_path / "bank").scan("s1"))
    assert pr.count == ps.count > 20
    for i in range(ps.count):
        np.testing.assert_array_equal(pr.mask(i), ps.mask(i))
    for col in ("voxels", "bbox", "centroid", "compactness", "contrast", "level"):
        np.testing.assert_array_equal(pr.table[col], ps.table[col])
    assert list(pr.table["source"]) == list(ps.table["source"])
    assert pr.table["bbox"].shape == (ps.count, 6) and pr.table["centroid"].shape == (ps.count, 3)
    assert bank.scan("s1").proposals_attrs["n_proposals"] == ps.count
    assert pr.nbytes_stored() > 0


def test_masks_and_voxels_in_roi(tmp_path):
    bank, img, body = _bank_with_scan(tmp_path)
    ps = _proposals(img, body)
    write_proposals(bank, "s1", ps)
    pr = ProposalReader(bank.scan("s1"))
    roi = (slice(4, 30), slice(10, 36), slice(0, 17))
    ids = [0, 5, ps.count - 1, ps.count - 2, 3]
    got = pr.masks(ids, roi)
    assert got.shape == (5, 26, 26, 17) and got.dtype == bool
    for k, i in enumerate(ids):
        np.testing.assert_array_equal(got[k], ps.mask(i)[roi])
    counts = pr.voxels_in_box(roi)
    expected = [ps.mask(i)[roi].sum() for i in range(ps.count)]
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(pr.voxels_in_box(None), ps.table["voxels"])
    with pytest.raises(IndexError):
        pr.masks([ps.count], roi)


def test_empty_set_and_missing_proposals(tmp_path):
    bank, img, body = _bank_with_scan(tmp_path)
    with pytest.raises(NoProposalsError, match="no proposals"):
        ProposalReader(bank.scan("s1"))
    write_proposals(bank, "s1", _features(from_label_map(np.zeros(SHAPE, np.uint8))))
    pr = ProposalReader(bank.scan("s1"))
    assert pr.count == 0
    assert pr.masks([], None).shape == (0, *SHAPE)
    assert pr.voxels_in_box(None).shape == (0,)


def test_rewrite_replaces(tmp_path):
    bank, img, body = _bank_with_scan(tmp_path)
    write_proposals(bank, "s1", _proposals(img, body))
    lm = np.zeros(SHAPE, np.uint8)
    lm[1:5, 1:5, 1:5] = 1
    write_proposals(bank, "s1", _features(from_label_map(lm)))
    pr = ProposalReader(bank.scan("s1"))
    assert pr.count == 1 and pr.mask(0).sum() == 64


@pytest.mark.parametrize("empty", [False, True])
def test_local_fast_open_equals_zarr_open(tmp_path, empty):
    """A local bank's reader is read straight from the files; a memory:// URL (an object
    store stand-in) goes through zarr: the same members and table, value and dtype."""
    import uuid
    from pathlib import Path

    import fsspec

    from maskbank.bank.proposal_store import _read_part_local

    bank, img, body = _bank_with_scan(tmp_path)
    ps = _features(from_label_map(np.zeros(SHAPE, np.uint8))) if empty else _proposals(img, body)
    write_proposals(bank, "s1", ps)
    local = bank.scan("s1")
    assert _read_part_local(local.group) is not None  # the fast path is the one taken
    fast = ProposalReader(local)
    fs, where = fsspec.filesystem("memory"), f"/bank-{uuid.uuid4().hex}"
    fs.put(str(Path(bank.location)) + "/", where, recursive=True)
    remote = Bank.open(f"memory://{where}").scan("s1")
    assert _read_part_local(remote.group) is None
    slow = ProposalReader(remote)
    assert fast.attrs == slow.attrs and fast.count == slow.count == ps.count
    for name in ("indptr", "starts", "stops"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert fast.table.keys() == slow.table.keys()
    for col in fast.table:
        assert fast.table[col].dtype == slow.table[col].dtype, col
        np.testing.assert_array_equal(fast.table[col], slow.table[col])
    if not empty:  # layers open lazily on both
        roi = (slice(4, 30), slice(10, 36), slice(0, 17))
        np.testing.assert_array_equal(fast.masks([0, 3], roi), slow.masks([0, 3], roi))
        assert fast.nbytes_stored() == slow.nbytes_stored() > 0
    fs.rm(where, recursive=True)


def test_a_missing_member_array_is_a_clear_error(tmp_path):
    """A damaged proposals part (an array deleted by hand) names the array; nothing crashes."""
    import shutil

    from maskbank.bank import BankError

    bank, img, body = _bank_with_scan(tmp_path)
    write_proposals(bank, "s1", _proposals(img, body))
    part = tmp_path / "bank" / "scans" / "s1" / "proposals"
    shutil.rmtree(part / "table" / "centroid")
    with pytest.raises(BankError, match="'centroid' is missing"):
        ProposalReader(bank.scan("s1"))
    shutil.rmtree(part / "members_stop")
    with pytest.raises(BankError, match="'members_stop' is missing"):
        ProposalReader(bank.scan("s1"))


def test_proposal_nbytes_measures_what_the_bank_stores(tmp_path):
    bank, img, body = _bank_with_scan(tmp_path)
    ps = _proposals(img, body)
    measured = proposal_nbytes(ps, bank.encoding)
    assert set(measured) == {*ps.prune_layers().layer_names, ""}
    assert all(v > 0 for v in measured.values())
    write_proposals(bank, "s1", ps)
    stored = ProposalReader(Bank.open(tmp_path / "bank").scan("s1")).nbytes_stored()
    assert abs(sum(measured.values()) - stored) <= 0.02 * stored, (measured, stored)
