"""Shared fixtures: small synthetic scans written to real Zarr banks in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.writing import Encoding

SHAPE = (72, 64, 48)
# 16^3 chunks in 32^3 shards so that small test volumes still span several chunks and shards.
SMALL = Encoding(chunk=16, max_shard=32)


def make_arrays(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.standard_normal(shape).astype(np.float16)
    body = np.zeros(shape, dtype=bool)
    body[8:-8, 8:-8, 4:-4] = True
    label = np.zeros(shape, dtype=np.uint16)
    label[20:40, 20:30, 10:30] = 3
    label[45:50, 40:50, 5:9] = 7
    return {"image": image, "body": body, "label": label}


def make_attrs(scan_id: str, dataset: str = "synthetic", modality: str = "ct") -> dict:
    return {
        "dataset": dataset,
        "modality": modality,
        "spacing": (1.5, 1.5, 2.0),
        "affine": np.diag([1.5, 1.5, 2.0, 1.0]),
        "source_path": f"/data/{scan_id}.nii.gz",
        "source_sha256": "0" * 64,
        "config_fingerprint": "cfg-abc123",
        "normalisation": {"method": "ct-window", "mean": np.float32(-200.0), "std": 350.0},
        "original_shape": np.array([512, 512, 120]),
    }


@pytest.fixture
def bank(tmp_path: Path) -> Bank:
    return Bank.create(tmp_path / "bank", encoding=SMALL)


@pytest.fixture
def filled(bank: Bank) -> Bank:
    """A bank with three scans across two datasets/modalities; one without a label."""
    bank.write_scan("ct-001", make_arrays(1), make_attrs("ct-001"))
    bank.write_scan("ct-002", make_arrays(2), make_attrs("ct-002"))
    arrays = make_arrays(3, shape=(40, 36, 30))
    del arrays["label"]
    bank.write_scan("mr-001", arrays, make_attrs("mr-001", dataset="brains", modality="mr"))
    return bank
