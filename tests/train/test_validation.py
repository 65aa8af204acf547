"""Held-out pair validation: scan split, metrics, and the trainer's records."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from maskbank.bank import Bank
from maskbank.train.incontext_net import build_model
from maskbank.train.pair_sampler import SamplerError
from maskbank.train.run import main
from maskbank.train.run_config import DataConfig, TrainConfig
from maskbank.train.validation import PairValidator, fills_crop, split_scans, summarise


def test_fills_crop_needs_cover_or_all_six_faces():
    m = torch.zeros(1, 4, 8, 8, 8, dtype=torch.bool)
    m[0, 0] = True  # all of it
    m[0, 1, :, :, :4] = True  # half: five faces, the far z face untouched
    m[0, 2, 2:6, 2:6, 2:6] = True  # inside, a boundary everywhere
    m[0, 3, :, 4, 4] = m[0, 3, 4, :, 4] = m[0, 3, 4, 4, :] = True  # thin, yet touches all six
    assert fills_crop(m).tolist() == [[True, False, False, True]]
    assert fills_crop(m, cover=0.5).tolist() == [[True, True, False, True]]


def test_split_scans_by_list_by_fraction_and_refuses_to_leave_none(phantom_bank):
    bank = Bank.open(phantom_bank)
    ids = [r["scan_id"] for r in bank.index]
    train, val = split_scans(bank, DataConfig(val_scans=(ids[0],)))
    assert val == [ids[0]] and train == tuple(ids[1:])
    assert split_scans(bank, DataConfig()) == (None, [])
    train, val = split_scans(bank, DataConfig(val_fraction=0.3))
    assert len(val) == 1 and set(train) | set(val) == set(ids) and not set(train) & set(val)
    assert split_scans(bank, DataConfig(val_fraction=0.3)) == (train, val)  # stable
    with pytest.raises(SamplerError, match="no training scans"):
        split_scans(bank, DataConfig(scans=(ids[0],), val_scans=(ids[0],)))
    with pytest.raises(SamplerError, match="not in bank"):
        split_scans(bank, DataConfig(val_scans=("nope",)))


class Oracle(nn.Module):
    """Returns the validation targets as logits: what a perfect network would predict."""

    def __init__(self, validator: PairValidator) -> None:
        super().__init__()
        self.batches = validator.batches

    def forward(self, ref_image, ref_masks, query_image):
        for b in self.batches:
            if torch.equal(b["query_image"], query_image):
                return b["query_masks"].float() * 20 - 10
        raise AssertionError("not a validation batch")


def test_validator_scores_a_perfect_and_a_blind_network(phantom_bank, tmp_path):
    bank = Bank.open(phantom_bank)
    ids = [r["scan_id"] for r in bank.index]
    cfg = TrainConfig.load("tiny", ["train.val_pairs=6"])
    val = PairValidator(phantom_bank, cfg, ids[:2], torch.device("cpu"))
    assert sum(len(b["ref_image"]) for b in val.batches) == 6
    numbers, rows = val.score(Oracle(val))
    assert len(rows) == 6 * cfg.data.k
    assert numbers["val_dice"] == 1.0 and numbers["val_vol_ratio"] == 1.0
    assert numbers["val_absent_clean"] == 1.0 and numbers["val_absent_fp"] == 0.0
    assert 0 < numbers["val_absent_share"] < 1  # the fixed set holds absent tasks
    assert numbers["val_dice_view"] == 1.0 and 0 < numbers["val_seen_share"] <= 1
    assert numbers["val_dice_seen"] <= 1 and all(r["seen_voxels"] <= r["true_voxels"] for r in rows)
    again = PairValidator(phantom_bank, cfg, ids[:2], torch.device("cpu"))
    assert torch.equal(again.batches[1]["query_masks"], val.batches[1]["query_masks"])
    torch.manual_seed(0)
    net = build_model("tiny")
    blind, _ = val.score(net)
    assert blind["val_dice"] < 0.9 and net.training  # train mode restored
    val.figure(net, tmp_path / "fig.png", n=2)
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_summarise_volume_ratio_and_absent_false_alarms():
    rows = [
        {"true_voxels": 10, "pred_voxels": 20, "dice": 0.5, "ref_fills": False},
        {"true_voxels": 10, "pred_voxels": 2, "dice": 0.3, "ref_fills": True},
        {"true_voxels": 0, "pred_voxels": 8, "dice": 0.0, "ref_fills": False},
        {"true_voxels": 0, "pred_voxels": 0, "dice": 1.0, "ref_fills": False},
    ]
    got = summarise(rows, crop_voxels=16)
    assert got["val_dice"] == pytest.approx(0.4)
    assert got["val_vol_ratio"] == pytest.approx(1.1) and got["val_vol_in_range"] == 0.5
    assert got["val_absent_share"] == 0.5 and got["val_absent_clean"] == 0.5
    assert got["val_absent_fp"] == pytest.approx(0.25) and got["val_ref_fill"] == 0.25
    assert math.isnan(summarise([], 16)["val_dice"])
    assert "val_dice_view" not in got  # rows without the pairs' geometry


def test_summarise_scores_the_reference_view_apart():
    rows = [  # a target half outside the reference crop, and one wholly outside it
        {"true_voxels": 10, "pred_voxels": 5, "dice": 0.6, "ref_fills": False,
         "seen_voxels": 5, "dice_view": 1.0, "dice_seen": 2 * 5 / 15},
        {"true_voxels": 8, "pred_voxels": 0, "dice": 0.0, "ref_fills": False,
         "seen_voxels": 0, "dice_view": 1.0, "dice_seen": 0.0},
        {"true_voxels": 0, "pred_voxels": 0, "dice": 1.0, "ref_fills": False,
         "seen_voxels": 0, "dice_view": 1.0, "dice_seen": 1.0},
    ]  # fmt: skip
    got = summarise(rows, crop_voxels=16)
    assert got["val_seen_share"] == pytest.approx(0.25)
    assert got["val_dice_view"] == 1.0  # only tasks with a target in the view
    assert got["val_dice_seen"] == pytest.approx((2 / 3) / 2)  # present tasks only


def test_run_writes_validation_records_and_figures(phantom_bank, tmp_path):
    bank = Bank.open(phantom_bank)
    held = [r["scan_id"] for r in bank.index][-1]
    out = tmp_path / "run"
    argv = ["--config", "tiny", "--bank", phantom_bank, "--out", str(out), "max_steps=4",
            "train.progress=false", "train.tensorboard=false", "train.val_every=2",
            "train.val_pairs=4", f"data.val_scans=[{held}]", "data.absent_frac=0.3"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_dice" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert all(0 <= r["val_dice"] <= 1 and r["val_absent_share"] > 0 for r in val)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(0 <= r["absent_share"] <= 1 and 0 <= r["ref_fill"] <= 1 for r in train_rows)
    assert sorted(p.name for p in (out / "val").glob("*.png")) == [
        "step_00000002.png",
        "step_00000004.png",
    ]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["config"]["data"]["val_scans"] == [held]
