"""train.run as a library: ``pretrain(TrainConfig, bank, out) -> RunSummary``, a ``Trainer``
built from a typed config only, and every ``data.<key>`` reaching the pair stream."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from maskbank.train.checkpointing import load_checkpoint
from maskbank.train.ranks import Placement, Preemption
from maskbank.train.run import RunSummary, Trainer, pretrain
from maskbank.train.run_config import DataConfig, TrainConfig

QUICK = ["train.progress=false", "train.tensorboard=false", "train.ckpt_every=2"]


def test_pretrain_from_python_returns_a_run_summary(phantom_bank, tmp_path):
    from maskbank.train import pretrain as exported

    assert exported is pretrain
    held_out = "phantom-pet-002"
    cfg = TrainConfig.load(
        "tiny",
        [*QUICK, "max_steps=3", f"data.val_scans=[{held_out}]", "train.val_pairs=2"],
    )
    summary = pretrain(cfg, phantom_bank, tmp_path / "run")
    assert isinstance(summary, RunSummary)
    assert (summary.steps, summary.start_step, summary.preempted) == (3, 0, False)
    assert summary.out == tmp_path / "run" and summary.seconds > 0
    assert summary.final_loss is not None and math.isfinite(summary.final_loss)
    assert summary.checkpoint == tmp_path / "run" / "checkpoints" / "last.pt"
    assert load_checkpoint(summary.checkpoint)["step"] == 3
    assert summary.validation is not None and 0 <= summary.validation["val_dice"] <= 1
    assert summary.outcome == "done"
    # Resumed to a later step: the summary counts from the checkpoint.
    more = TrainConfig.load("tiny", [*QUICK, "max_steps=4", f"data.val_scans=[{held_out}]",
                                     "train.val_pairs=2"])  # fmt: skip
    again = pretrain(more, phantom_bank, tmp_path / "run", resume=True)
    assert (again.start_step, again.steps) == (3, 4)


def test_initial_weights_follow_the_config_seed_not_the_global_rng(phantom_bank, tmp_path):
    cfg = TrainConfig.load("tiny", [*QUICK, "max_steps=1"])
    torch.manual_seed(1)
    a = pretrain(cfg, phantom_bank, tmp_path / "a")
    after_a = torch.rand(4)
    torch.manual_seed(2)
    b = pretrain(cfg, phantom_bank, tmp_path / "b")
    after_b = torch.rand(4)
    assert a.final_loss == b.final_loss
    wa, wb = (load_checkpoint(s.checkpoint)["model"] for s in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The library never seeds the global RNG: the caller's stream goes on from its own state.
    assert not torch.equal(after_a, after_b)


def test_trainer_and_pretrain_refuse_anything_but_a_train_config(phantom_bank, tmp_path):
    args = argparse.Namespace(config="tiny", bank=phantom_bank, out=str(tmp_path), overrides=[])
    place = Placement(0, 1, torch.device("cpu"))
    with pytest.raises(TypeError, match="Trainer takes a TrainConfig, not Namespace"):
        Trainer(args, phantom_bank, tmp_path, place, Preemption())
    with pytest.raises(TypeError, match="pretrain takes a TrainConfig, not dict"):
        pretrain(TrainConfig().to_dict(), phantom_bank, tmp_path)


# One non-default value per DataConfig key, all usable on the phantom bank.
EVERY_DATA_KEY = {
    "crop": 32,
    "margin": 4,
    "min_overlap": 0.75,
    "k": 5,
    "min_mask_voxels": 12,
    "dataset_weights": {"phantom": 2.0},
    "modality_weights": {"mr": 0.5},
    "batch_size": 3,
    "num_workers": 0,
    "prefetch_factor": 2,
    "worker_timeout": 60.0,
    "scans": ("phantom-ct-000", "phantom-mr-001"),
    "proposals": "default",
    "disjoint_frac": 0.1,
    "absent_frac": 0.15,
    "max_ref_fill": 0.7,
    "val_scans": ("phantom-pet-002",),
    "val_fraction": 0.0,
    "max_anchor_tries": 7,
    "pairs_per_scan_visit": 3,
    "short_scans": "refuse",
}


def test_every_data_key_reaches_the_sampler(phantom_bank, tmp_path):
    """Each knob of the stream is a data.<key> the trainer hands to PairStream unchanged
    (a new DataConfig key must be added here)."""
    assert set(EVERY_DATA_KEY) == {f.name for f in fields(DataConfig)}
    overrides = [
        f"data.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
        for k, v in EVERY_DATA_KEY.items()
    ]
    cfg = TrainConfig.load("tiny", [*QUICK, "train.val_pairs=1", *overrides])
    assert {k: getattr(cfg.data, k) for k in EVERY_DATA_KEY} == EVERY_DATA_KEY
    trainer = Trainer(
        cfg, phantom_bank, tmp_path, Placement(0, 1, torch.device("cpu")), Preemption()
    )
    assert trainer.stream.cfg == cfg.data  # the held-out scan is outside data.scans already
    assert trainer.stream.cfg.pairs_per_scan_visit == 3 and trainer.stream.cfg.max_anchor_tries == 7
    batch = trainer.stream.batch(0)
    assert batch["ref_image"].shape == (3, 1, 40, 40, 40)  # batch_size, crop + 2 * margin
    assert batch["proposal_ids"].shape == (3, 5)
    scans = {trainer.stream.scan_ids[i] for i in batch["scan_index"].tolist()}
    assert len(scans) == 1  # three consecutive pairs: one scan visit


def test_the_trainer_opens_the_bank_once(phantom_bank, tmp_path, monkeypatch):
    """The split, the stream and the validation pairs share one open of the bank (each
    open parses the index: ~0.7 s at 100,000 scans)."""
    from maskbank.bank import Bank

    opened = []
    real_open = Bank.open.__func__
    monkeypatch.setattr(Bank, "open", classmethod(lambda cls, *a, **k: opened.append(a) or
                                                    real_open(cls, *a, **k)))  # fmt: skip
    cfg = TrainConfig.load("tiny", [*QUICK, "train.val_pairs=1", "data.val_fraction=0.5"])
    trainer = Trainer(
        cfg, phantom_bank, tmp_path, Placement(0, 1, torch.device("cpu")), Preemption()
    )
    assert trainer.val_scans and trainer.validator is not None
    assert len(opened) == 1


def test_importing_the_package_stays_cheap():
    code = "import sys, maskbank.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
