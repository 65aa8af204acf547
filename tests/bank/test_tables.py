"""bank.scans / bank.proposals(scan_id): the bank as pandas tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bank import Bank, NoProposalsError
from flows.demo_bank import build_phantom_bank


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
    props = small_bank.proposals("phantom-ct-000")
    assert len(props) == small_bank.row("phantom-ct-000")["n_proposals"]
    assert {"source", "voxels", "volume_ml", "x0", "z1", "cx", "compactness"} <= set(props)
    assert np.allclose(props["volume_ml"], props["voxels"] * 1.5**3 / 1000)
    i = int(props["voxels"].idxmax())
    from bank import ProposalReader

    mask = ProposalReader(scan).mask(i)
    assert mask.sum() == props.loc[i, "voxels"]
    xs, ys, zs = np.nonzero(mask)
    row = props.loc[i]
    assert (row["x0"], row["y0"], row["z0"]) == (xs.min(), ys.min(), zs.min())
    assert (row["x1"], row["y1"], row["z1"]) == (xs.max() + 1, ys.max() + 1, zs.max() + 1)
    with pytest.raises(NoProposalsError):
        small_bank.proposals("raw-000")
