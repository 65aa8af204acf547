"""bench/gpu_pretrain.py --encoder: the same budgeted check on nnU-Net's residual encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

SCRIPT = REPO / "bench" / "gpu_pretrain.py"


def test_help_offers_the_resenc_presets():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--encoder {iris,resenc-l,resenc-tiny}" in proc.stdout
    assert "dynamic-network-architectures==0.4.4" in proc.stdout  # carried to the GPU machine


@pytest.mark.slow
def test_smoke_runs_the_resenc_preset(tmp_path):
    pytest.importorskip("dynamic_network_architectures")
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--encoder", "resenc-tiny", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["preset"] == "resenc-tiny" and result["steps"] == 10
    assert set(result["incontext"]) == {"pretrained", "random"}
