"""Training that cannot silently corrupt itself: non-finite steps are skipped on every rank
together, a diverged run stops, resumes are checked, hung workers end the run, URLs refused."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskbank.train.checkpointing import load_checkpoint, non_finite_tensors
from maskbank.train.run import main

from .test_run import _cmd, _env, _metrics

FAST = ["train.progress=false", "train.tensorboard=false"]


def _argv(bank: str, out: Path, *extra: str) -> list[str]:
    flags = [x for x in extra if x.startswith("--")]  # before the overrides (argparse)
    keys = [x for x in extra if not x.startswith("--")]
    return [*flags, "--config", "tiny", "--bank", bank, "--out", str(out), *FAST, *keys]


def _assert_finite(path: Path) -> dict:
    state = load_checkpoint(path)
    assert non_finite_tensors({"model": state["model"], "ema": state["ema"]}) == []
    return state


@pytest.fixture(scope="module")
def nan_run(phantom_bank, tmp_path_factory) -> Path:
    """5 steps whose 3rd and 4th have NaN gradients (the loss stays finite)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    extra = [
        "max_steps=5",
        "train.ckpt_every=1",
        "train.keep_last=3",
        "train.debug_nan.steps=[3,4]",
    ]
    assert main(_argv(phantom_bank, out, *extra)) == 0
    return out


def test_non_finite_gradients_are_skipped_and_counted(nan_run):
    rows = _metrics(nan_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2]
    assert rows[2]["grad_norm"] is None and rows[2]["loss"] is not None  # finite loss
    assert rows[4]["grad_norm"] is not None
    ckpts = nan_run / "checkpoints"
    state = _assert_finite(ckpts / "last.pt")
    assert state["step"] == 5 and state["skipped_steps"] == 2
    # Written once: last.pt is the newest step file; only the last 3 are kept.
    names = sorted(p.name for p in ckpts.glob("step_*.pt"))
    assert names == ["step_00000003.pt", "step_00000004.pt", "step_00000005.pt"]
    assert os.path.samefile(ckpts / "last.pt", ckpts / "step_00000005.pt")
    # The skipped step 4 left weights and EMA as step 3 did (itself skipped); step 5 moved on.
    s3, s4 = load_checkpoint(ckpts / names[0]), load_checkpoint(ckpts / names[1])
    for part in ("model", "ema"):
        a, b = s3[part], s4[part]
        a, b = (a, b) if part == "model" else (a["shadow"], b["shadow"])
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert not all(torch.equal(s4["model"][k], state["model"][k]) for k in state["model"])


def test_a_non_finite_loss_is_skipped_not_raised(phantom_bank, tmp_path):
    extra = ["max_steps=2", "train.ckpt_every=2", "train.debug_nan.steps=[2]"]
    out = tmp_path / "run"
    assert main(_argv(phantom_bank, out, *extra, "train.debug_nan.target=loss")) == 0
    rows = _metrics(out)
    assert rows[1]["loss"] is None and [r["skipped_steps"] for r in rows] == [0, 1]
    _assert_finite(out / "checkpoints" / "last.pt")


def test_too_many_skips_in_a_row_stop_with_exit_2(phantom_bank, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["max_steps=8", "train.ckpt_every=1", "train.max_skipped_steps=2",
             "train.debug_nan.steps=[2,3,4]"]  # fmt: skip
    assert main(_argv(phantom_bank, out, *extra)) == 2
    err = capsys.readouterr().err
    assert "2 steps in a row (up to step 3)" in err and "weights are those of step 1" in err
    assert _metrics(out)[-1]["step"] == 3
    state = _assert_finite(out / "checkpoints" / "last.pt")
    assert state["step"] == 2  # step 3's checkpoint was never written


def test_resume_checks_the_config_and_lets_max_steps_grow(phantom_bank, nan_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(nan_run, run)
    bad = ["--resume", "max_steps=6", "batch_size=1", "data.k=12"]
    assert main(_argv(phantom_bank, run, *bad)) == 2
    err = capsys.readouterr().err
    assert "data.batch_size=2 data.k=13" in err and "data.batch_size=1 data.k=12" in err
    assert main(_argv(phantom_bank, run, "--resume", "max_steps=4")) == 2
    assert "past max_steps=4; pass max_steps=5 or more" in capsys.readouterr().err
    assert main(_argv(phantom_bank, run, "--resume", "max_steps=6")) == 0
    state = _assert_finite(run / "checkpoints" / "last.pt")
    assert state["step"] == 6 and state["skipped_steps"] == 2
    assert [r["skipped_steps"] for r in _metrics(run)][-1] == 2


def test_out_urls_are_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--bank", str(tmp_path / "nope"), "--out", "s3://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "--out s3://bucket/run is a URL" in err and "local or mounted path" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_ranks_skip_together_when_only_rank_1_sees_nan(phantom_bank, tmp_path):
    out = tmp_path / "ddp"
    nan = ["train.debug_nan.steps=[2]", "train.debug_nan.ranks=[1]", "train.tensorboard=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           *_cmd(phantom_bank, out, "max_steps=3", "train.ckpt_every=3", *nan)[1:]]  # fmt: skip
    subprocess.run(cmd, env=_env(), check=True, timeout=300)
    rows = _metrics(out)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]  # rank 0 learnt of rank 1's NaN
    state = _assert_finite(out / "checkpoints" / "last.pt")
    hashes = state["rank_weight_hashes"]
    assert state["step"] == 3 and len(hashes) == 2 and hashes[0] == hashes[1]


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["hung", "dead"])
def test_a_hung_or_dead_worker_ends_the_run_with_exit_2(phantom_bank, tmp_path, sig):
    out = tmp_path / "run"
    extra = ["max_steps=200", "train.tensorboard=false", "data.num_workers=1",
             "data.prefetch_factor=1", "data.worker_timeout=2"]  # fmt: skip
    proc = subprocess.Popen(_cmd(phantom_bank, out, *extra), env=_env(), stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        while not _metrics(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:  # a stopped worker is ours to clean up
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 2, err
    assert "data loading failed" in err and "DataLoader" in err
    if sig == signal.SIGSTOP:
        assert "timed out" in err and "data.worker_timeout=2" in err
    else:
        assert "worker died" in err and str(workers[0]) in err
