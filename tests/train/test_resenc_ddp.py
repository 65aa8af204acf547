"""The resenc encoder under torchrun: two gloo ranks keep identical weights and resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO

pytest.importorskip("dynamic_network_architectures")


@pytest.mark.slow
def test_torchrun_two_ranks_resenc_tiny_and_resume(phantom_bank, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            str(REPO / "train" / "run.py"), "--config", "resenc-tiny", "--bank", phantom_bank,
            "--out", str(out)]  # fmt: skip
    quick = ["train.progress=false", "train.tensorboard=false", "train.ckpt_every=2"]
    subprocess.run([*base, *quick, "max_steps=2"], env=env, check=True, timeout=600)
    subprocess.run([*base, "--resume", *quick, "max_steps=3"], env=env, check=True, timeout=600)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3
    assert state["config"]["model"] == {"preset": "resenc-tiny", "encoder": "resenc"}
    hashes = state["rank_weight_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert any(k.startswith("encoder.stages.") for k in state["model"])
