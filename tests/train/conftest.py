"""A small phantom bank with proposals, built once per session with the real writers."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskbank.flows.demo_bank import build_phantom_bank

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def phantom_bank(tmp_path_factory) -> str:
    """3 scans (CT, MR, PET) of 80x80x64 with >= 13 proposals each."""
    path = tmp_path_factory.mktemp("train") / "bank"
    build_phantom_bank(path, n_scans=3, shape=(80, 80, 64))
    return str(path)


@pytest.fixture(scope="session")
def sparse_bank(tmp_path_factory) -> str:
    """One scan with only its 9 phantom structures as proposals (fewer than k=13)."""
    path = tmp_path_factory.mktemp("train") / "sparse"
    build_phantom_bank(path, n_scans=1, shape=(64, 64, 48), extra_proposals=False)
    return str(path)
