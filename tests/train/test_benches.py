"""The benchmark scripts run end to end (CPU smoke sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_gpu_step_smoke_runs_on_cpu():
    cmd = [sys.executable, str(REPO / "bench" / "gpu_step.py"), "--smoke", "--json", "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu"
    assert result["compute_only"]["steps_per_s"] > 0
    assert result["trainer"]["rc"] == 0 and result["trainer"]["steps"] == 2
    assert 0 <= result["trainer"]["data_wait"] <= 1


def test_sampler_bench_small(phantom_bank):
    pytest.importorskip("h5py", reason="the baseline needs h5py (pip install -e '.[bench]')")
    cmd = [sys.executable, str(REPO / "bench" / "sampler.py"), "--bank", phantom_bank, "--json",
           "--crop", "32", "--margin", "8", "--pairs", "2", "--baseline-pairs", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pairs_per_s"] > 0 and result["baseline_pairs_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["pairs_per_s"] / result["baseline_pairs_per_s"])
    assert result["ratio_cpu"] == pytest.approx(
        result["pairs_per_cpu_s"] / result["baseline_pairs_per_cpu_s"]
    )
    assert 0 <= result["chunk_cache_hit_rate"] <= 1 and result["pairs_per_scan_visit"] == 1
