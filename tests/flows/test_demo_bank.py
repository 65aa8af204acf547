"""Phantom banks carry label names and metadata like prepared evaluation banks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maskbank.bank import Bank
from maskbank.flows.demo_bank import add_phantom_scan, build_phantom_bank
from maskbank.pipeline.phantom import NAMES


def test_phantom_scans_have_names_metadata_and_dataset(tmp_path: Path) -> None:
    bank = build_phantom_bank(
        tmp_path / "b", n_scans=1, shape=(48, 48, 40), extra_proposals=False, dataset="eval"
    )
    (sid,) = bank.scan_ids
    scan = bank.scan(sid)
    assert scan.dataset == "eval" and scan.metadata == {}
    assert scan.label_names == NAMES

    add_phantom_scan(
        Bank.open(tmp_path / "b", mode="a"),
        "healthy",
        shape=(48, 48, 40),
        n_lesions=0,
        metadata={"diagnosis": "healthy"},
        extra_proposals=False,
    )
    healthy = Bank.open(tmp_path / "b").scan("healthy")
    lesion = max(NAMES)  # the last structure drawn
    assert NAMES[lesion] == "lesion" and lesion not in np.unique(healthy.read("label"))
    assert healthy.label_names == {v: n for v, n in NAMES.items() if v != lesion}
    assert healthy.metadata == {"diagnosis": "healthy"}
