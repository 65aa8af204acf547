"""`maskbank pretrain` and the demo's pretraining stage call ``maskbank.train.pretrain`` with a
typed config (no argv is built for train/run.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from maskbank.flows.cli import main as cli
from maskbank.flows.demo_bank import build_phantom_bank

QUICK = ["train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pretrain") / "bank"
    build_phantom_bank(path, n_scans=3, shape=(80, 80, 64))
    return path


def test_maskbank_pretrain_runs_the_library_and_resumes(bank, tmp_path, capsys, monkeypatch):
    import maskbank.train.run as run

    calls = []
    real = run.pretrain
    monkeypatch.setattr(run, "pretrain", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    out = tmp_path / "run"
    assert cli(["pretrain", str(bank), "--out", str(out), "max_steps=2", *QUICK]) == 0
    (args, kwargs), = calls  # fmt: skip
    assert isinstance(args[0], run.TrainConfig) and args[0].train.max_steps == 2
    assert "done" in capsys.readouterr().err
    assert (out / "checkpoints" / "last.pt").exists()
    assert cli(["pretrain", str(bank), "--out", str(out), "--resume", "max_steps=3", *QUICK]) == 0
    assert calls[-1][1]["resume"] is True
    assert cli(["pretrain", str(bank), "--out", str(out), "train.max_stepz=3"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err


def test_demo_pretrain_stage_builds_a_typed_config(bank, tmp_path, capsys, monkeypatch):
    from maskbank.flows.commands import demo

    monkeypatch.setattr(demo, "pretraining_scans", lambda _: (["phantom-ct-000", "phantom-mr-001"], ["phantom-pet-002"]))  # fmt: skip
    (tmp_path / "bank").symlink_to(bank)
    args = argparse.Namespace(steps=2, no_progress=True)
    assert demo.stage_pretrain(args, {"out": tmp_path, "bank": tmp_path / "bank"}) == 0
    printed = capsys.readouterr().out
    assert "pretraining loss over 2 steps" in printed
    assert "held-out pair Dice (scans left out of pretraining) by step: 2: " in printed
    assert "an exact copy of what it shows would score" in printed
    import yaml

    config = yaml.safe_load((tmp_path / "pretrain" / "config.yaml").read_text())
    assert config["data"]["scans"] == ["phantom-ct-000", "phantom-mr-001"]
    assert config["data"]["val_scans"] == ["phantom-pet-002"]
    assert config["train"]["max_steps"] == 2 and config["train"]["ckpt_every"] == 20
    assert config["model"]["preset"] == "tiny" and config["data"]["crop"] == 32
