"""Scans short of K proposals: skipped with one warning (default) or refused (data.short_scans)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from maskbank.bank import Bank
from maskbank.flows.demo_bank import add_phantom_scan, build_phantom_bank
from maskbank.train.pair_sampler import PairStream, SamplerError
from maskbank.train.run import main
from maskbank.train.run_config import ConfigError, DataConfig, TrainConfig

CFG = DataConfig(crop=32, margin=8, k=13, min_mask_voxels=16, batch_size=2)
SHORT = "short-ct-000"


@pytest.fixture(scope="module")
def mixed_bank(tmp_path_factory) -> str:
    """Two phantoms with >= 13 proposals and one with its 9 structures only."""
    path = tmp_path_factory.mktemp("short") / "bank"
    build_phantom_bank(path, n_scans=2, shape=(64, 64, 48))
    add_phantom_scan(Bank.create(path), SHORT, "ct", (64, 64, 48), seed=5, extra_proposals=False)
    return str(path)


def test_skip_leaves_short_scans_out_and_says_how_many(mixed_bank, caplog):
    with caplog.at_level(logging.WARNING, logger="maskbank.train.scan_choice"):
        stream = PairStream(mixed_bank, CFG, seed=3)
    assert SHORT not in stream.scan_ids and len(stream.scan_ids) == 2
    (record,) = caplog.records
    assert "skipping 1 of 3 scan(s)" in record.getMessage()
    assert f"{SHORT} (9)" in record.getMessage()
    batch = stream.batch(0)
    assert {stream.scan_ids[int(i)] for i in batch["scan_index"]} <= set(stream.scan_ids)
    # Other ranks of a run stay quiet: one warning per run, not one per process.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskbank.train.scan_choice"):
        PairStream(mixed_bank, CFG, rank=1, world_size=2)
    assert not caplog.records


def test_refuse_keeps_the_error(mixed_bank):
    with pytest.raises(SamplerError, match=rf"1 scan\(s\) .* fewer than k=13 proposals: {SHORT}"):
        PairStream(mixed_bank, replace(CFG, short_scans="refuse"))


def test_every_scan_short_is_an_error_either_way(mixed_bank):
    for policy in ("skip", "refuse"):
        with pytest.raises(SamplerError, match=r"fewer than k=13 proposals: short-ct-000 \(9\)"):
            PairStream(mixed_bank, replace(CFG, scans=(SHORT,), short_scans=policy))
    with pytest.raises(SamplerError, match=r"every scan \(1\).*lower data.k"):
        PairStream(mixed_bank, replace(CFG, scans=(SHORT,)))


def test_policy_is_a_checked_config_key():
    cfg = TrainConfig.load("tiny", ["data.short_scans=refuse"])
    assert cfg.data.short_scans == "refuse" and TrainConfig().data.short_scans == "skip"
    with pytest.raises(ConfigError, match="data.short_scans='drop': choose one of skip, refuse"):
        TrainConfig.load("tiny", ["data.short_scans=drop"])


def test_a_run_trains_with_skip_and_stops_with_refuse(mixed_bank, tmp_path, capsys, caplog):
    quick = ["max_steps=1", "train.progress=false", "train.tensorboard=false"]
    args = ["--config", "tiny", "--bank", mixed_bank, "--out"]
    with caplog.at_level(logging.WARNING, logger="maskbank.train.scan_choice"):
        assert main([*args, str(tmp_path / "skip"), *quick]) == 0
    assert sum("skipping 1 of 3 scan(s)" in r.getMessage() for r in caplog.records) == 1
    rows = (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["step"] == 1
    capsys.readouterr()
    assert main([*args, str(tmp_path / "refuse"), *quick, "data.short_scans=refuse"]) == 2
    assert f"fewer than k=13 proposals: {SHORT} (9)" in capsys.readouterr().err
