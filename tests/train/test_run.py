"""End-to-end runs of train/run.py on the phantom bank (CPU, tiny preset)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.run import main

from .conftest import REPO

QUICK = ["train.progress=false", "train.tensorboard=true", "train.image_every=4"]


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _env() -> dict[str, str]:
    # One intra-op thread: identical float reductions in every process, no oversubscription.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cmd(bank: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train" / "run.py"), "--config", "tiny", "--bank", bank,
            "--out", str(out), *QUICK, *extra]  # fmt: skip


@pytest.mark.slow
def test_tiny_loss_falls_on_cpu(phantom_bank, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    cmd = _cmd(phantom_bank, out, "max_steps=16", "train.ckpt_every=8")
    subprocess.run(cmd, env=_env(), check=True, timeout=300)
    assert time.time() - t0 < 120
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    for r in rows:
        assert {"step", "loss", "pairs_per_s", "data_wait"} <= set(r)
        assert r["pairs_per_s"] > 0 and 0 <= r["data_wait"] <= 1
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.9 * first, (first, last)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_00000008.pt", "step_00000016.pt"]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 16 and state["config"]["train"]["max_steps"] == 16
    assert state["sampler"]["next_batch"] == 16 and state["bank_fingerprint"]
    assert {"model", "ema", "optimizer", "scheduler", "rng"} <= set(state)
    assert (out / "config.yaml").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_missing_bank_and_sparse_bank_give_clear_errors(tmp_path, sparse_bank, capsys):
    assert main(["--bank", str(tmp_path / "nope"), "--out", str(tmp_path / "r1")]) == 2
    assert "cannot open bank" in capsys.readouterr().err
    assert main(["--bank", sparse_bank, "--out", str(tmp_path / "r2")]) == 2
    assert "fewer than k=13 proposals" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_and_resume_match_uninterrupted_run(phantom_bank, tmp_path):
    steps = ["max_steps=10", "train.ckpt_every=100"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_cmd(phantom_bank, full, *steps), env=_env(), check=True, timeout=300)

    proc = subprocess.Popen(_cmd(phantom_bank, cut, *steps), env=_env())
    deadline = time.time() + 240
    while len(_metrics(cut)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    killed_at = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 3 <= killed_at < 10, killed_at  # really interrupted mid-run

    subprocess.run(_cmd(phantom_bank, cut, *steps, "--resume"), env=_env(), check=True, timeout=300)
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 10
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), key
    assert [r["step"] for r in _metrics(cut)] == list(range(1, 11))


@pytest.mark.slow
def test_torchrun_two_ranks_gloo_keep_identical_weights(phantom_bank, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           *_cmd(phantom_bank, out, "max_steps=4", "train.ckpt_every=2")[1:]]  # fmt: skip
    subprocess.run(cmd, env=_env(), check=True, timeout=300)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 4
    hashes = state["rank_weight_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["pairs_per_s"] > 0
