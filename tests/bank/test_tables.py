"""bank.scans / bank.proposal_table(scan_id): the bank as pandas tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from maskbank.bank import Bank, NoProposalsError
from maskbank.bank.writing import write_proposals
from maskbank.flows.demo_bank import build_phantom_bank
from maskbank.pipeline.proposals.external import from_masks
from maskbank.pipeline.proposals.features import compute_features


@pytest.fixture(scope="module")
def small_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables") / "bank"
    build_phantom_bank(str(root), n_scans=2, shape=(48, 48, 40))
    bank = Bank.create(str(root))
    attrs = {
        "dataset": "raw", "modality": "mr", "spacing": [1.0, 2.0, 3.0], "source_path": "a.nii",
        "source_sha256": "0" * 64, "fingerprint": "f",
        "normalization": {"modality": "mr", "clip": [1.0, 9.0], "mean": 4.0, "std": 2.0},
    }  # fmt: skip
    bank.write_scan("raw-000", {"image": np.ones((10, 10, 10), np.float32)}, attrs)
    box = np.zeros(bank.scan("phantom-ct-000").shape, bool)
    box[4:20, 6:30, 2:12] = True
    boxes = compute_features(from_masks([box], "boxes"), None, None)
    write_proposals(bank, "phantom-ct-000", boxes, name="boxes")
    return Bank.open(str(root))


def test_scan_table_comes_from_the_index(small_bank):
    table = small_bank.scans
    assert list(table.index) == small_bank.scan_ids == list(table["scan_id"])
    raw = table.loc["raw-000"]
    assert raw["shape"] == (10, 10, 10) and raw["spacing"] == (1.0, 2.0, 3.0)
    assert raw["volume_ml"] == pytest.approx(6.0) and raw["n_proposals"] == 0
    assert (raw["clip_low"], raw["clip_high"], raw["norm_mean"], raw["norm_std"]) == (1, 9, 4, 2)
    assert not raw["has_label"] and raw["source"] == "a.nii"
    ct = table.loc["phantom-ct-000"]
    assert ct["has_label"] and ct["n_proposals"] > 0 and ct["bytes"] > 0
    assert math.isnan(ct["norm_mean"])  # the phantom builder stores no normalisation
    assert len(table[table["modality"] == "ct"]) == 1  # users filter as they know


def test_proposal_table_has_one_row_per_proposal(small_bank):
    scan = small_bank.scan("phantom-ct-000")
    props = small_bank.proposal_table("phantom-ct-000")
    assert len(props) == small_bank.row("phantom-ct-000")["n_proposals"]
    assert {"source", "voxels", "volume_ml", "x0", "z1", "cx", "compactness"} <= set(props)
    assert np.allclose(props["volume_ml"], props["voxels"] * 1.5**3 / 1000)
    i = int(props["voxels"].idxmax())
    from maskbank.bank.sampling import ProposalReader

    mask = ProposalReader(scan).mask(i)
    assert mask.sum() == props.loc[i, "voxels"]
    xs, ys, zs = np.nonzero(mask)
    row = props.loc[i]
    assert (row["x0"], row["y0"], row["z0"]) == (xs.min(), ys.min(), zs.min())
    assert (row["x1"], row["y1"], row["z1"]) == (xs.max() + 1, ys.max() + 1, zs.max() + 1)
    with pytest.raises(NoProposalsError):
        small_bank.proposal_table("raw-000")


def test_scan_table_and_proposal_table_show_every_set(small_bank):
    table = small_bank.scans
    ct = table.loc["phantom-ct-000"]
    assert ct["proposal_sets"] == {"boxes": 1, "default": ct["n_proposals"]}
    mr = table.loc["phantom-mr-001"]
    assert mr["proposal_sets"] == {"default": mr["n_proposals"]} and mr["n_proposals"] > 0
    assert table.loc["raw-000"]["proposal_sets"] == {}
    with_boxes = table[table["proposal_sets"].map(lambda sets: "boxes" in sets)]
    assert list(with_boxes.index) == ["phantom-ct-000"]
    boxes = small_bank.proposal_table("phantom-ct-000", "boxes")
    assert list(boxes["source"]) == ["boxes"] and list(boxes["voxels"]) == [16 * 24 * 10]
    assert (boxes.loc[0, "x0"], boxes.loc[0, "z1"]) == (4, 12)
    assert small_bank.scan("phantom-ct-000").proposal_table("boxes").equals(boxes)
    with pytest.raises(NoProposalsError, match=r"'boxes'.*its sets: 'default'"):
        small_bank.proposal_table("phantom-mr-001", "boxes")
