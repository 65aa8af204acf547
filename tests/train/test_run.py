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

from maskbank.train.run import main

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
def test_tiny_run_logs_every_step_and_checkpoints_on_cpu(phantom_bank, tmp_path):
    """End to end through `python train/run.py`; that the network fits is tested on fixed
    pairs in test_incontext_net (16 streamed pairs are too few and too varied to show it)."""
    out = tmp_path / "run"
    cmd = _cmd(phantom_bank, out, "max_steps=16", "train.ckpt_every=8")
    subprocess.run(cmd, env=_env(), check=True, timeout=300)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    for r in rows:
        assert {"step", "loss", "pairs_per_s", "data_wait"} <= set(r)
        assert r["pairs_per_s"] > 0 and 0 <= r["data_wait"] <= 1
        assert 0 < r["loss"] < 3
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
    assert main(["--bank", sparse_bank, "--out", str(tmp_path / "r3"), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(["--bank", sparse_bank, "--out", str(tmp_path / "r4"), "train.max_stepz=3"]) == 2
    assert "unknown config key 'train.max_stepz'" in capsys.readouterr().err


def test_usage_errors_exit_2_in_one_line_and_bugs_keep_their_traceback(
    tmp_path, phantom_bank, capsys
):
    quick = ["max_steps=1", "train.progress=false", "train.tensorboard=false"]
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    usage = [
        (["--out", str(blocker / "run")], "cannot create --out"),  # a refused --out
        (["--out", str(tmp_path / "r1"), "data.crop=36"], "multiple of 8"),
        (["--out", str(tmp_path / "r2"), "optim.name=sgd"], "optim.name must be one of"),
        (["--out", str(tmp_path / "r3"), "data.scans=[a"], "is not valid YAML"),
    ]
    for argv, message in usage:
        assert main(["--bank", phantom_bank, *argv, *quick]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
    # Not a usage error (the augmentation generator cannot live on the meta device): it
    # propagates with its traceback instead of being reported as exit 2.
    meta = ["--out", str(tmp_path / "r4"), "augment.device=meta", *quick]
    with pytest.raises(RuntimeError, match="META"):
        main(["--bank", phantom_bank, *meta])


STEPS = ["max_steps=10", "train.ckpt_every=3"]


@pytest.fixture(scope="module")
def uninterrupted(phantom_bank, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(_cmd(phantom_bank, out, *STEPS), env=_env(), check=True, timeout=300)
    return out / "checkpoints" / "last.pt"


def _interrupt(bank: str, out: Path, sig: int, after_steps: int, *extra: str) -> int:
    """Start a run in its own process group and signal the whole group (as a scheduler's
    preemption does) once ``after_steps`` steps are logged; return the checkpointed step."""
    proc = subprocess.Popen(_cmd(bank, out, *STEPS, *extra), env=_env(), start_new_session=True)
    deadline = time.time() + 240
    while len(_metrics(out)) < after_steps and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    rc = proc.wait(timeout=120)
    assert rc == (0 if sig == signal.SIGTERM else -sig), rc
    return torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]


def _assert_same_weights(path_a: Path, path_b: Path) -> None:
    a = torch.load(path_a, weights_only=False)
    b = torch.load(path_b, weights_only=False)
    assert a["step"] == b["step"] == 10
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), key


@pytest.mark.slow
def test_sigterm_and_resume_match_uninterrupted_run(phantom_bank, tmp_path, uninterrupted):
    cut = tmp_path / "cut"
    # A DataLoader worker gets the SIGTERM too and must not die before the checkpoint;
    # the worker count does not change the stream, so the run still matches.
    saved = _interrupt(phantom_bank, cut, signal.SIGTERM, 2, "data.num_workers=1")
    assert 2 <= saved < 10, saved  # checkpointed mid-run, at the step it stopped
    subprocess.run(_cmd(phantom_bank, cut, *STEPS, "--resume"), env=_env(), check=True, timeout=300)
    _assert_same_weights(uninterrupted, cut / "checkpoints" / "last.pt")
    assert [r["step"] for r in _metrics(cut)] == list(range(1, 11))


@pytest.mark.slow
def test_sigkill_and_resume_from_periodic_checkpoint(phantom_bank, tmp_path, uninterrupted):
    cut = tmp_path / "killed"
    saved = _interrupt(phantom_bank, cut, signal.SIGKILL, after_steps=4)
    assert saved in (3, 6, 9), saved  # only the periodic checkpoints survive a hard kill
    subprocess.run(_cmd(phantom_bank, cut, *STEPS, "--resume"), env=_env(), check=True, timeout=300)
    _assert_same_weights(uninterrupted, cut / "checkpoints" / "last.pt")
    assert _metrics(cut)[-1]["step"] == 10


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
