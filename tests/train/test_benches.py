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
           "--crop", "32", "--margin", "8", "--pairs", "4", "--baseline-pairs", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pairs_per_s"] > 0 and result["baseline_pairs_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["pairs_per_s"] / result["baseline_pairs_per_s"])
    assert result["ratio_cpu"] == pytest.approx(
        result["pairs_per_cpu_s"] / result["baseline_pairs_per_cpu_s"]
    )
    assert 0 <= result["chunk_cache_hit_rate"] <= 1 and result["pairs_per_scan_visit"] == 1
    rounds = result["ratio_rounds"]
    assert rounds["n"] == 2 and rounds["min"] <= rounds["median"] <= rounds["max"]
    assert result["huge_bank"] is False


def test_sampler_bench_huge_bank_mode_forgets_scans_at_each_visit(phantom_bank):
    """--huge-bank: each visit starts with no open scan and no decoded chunk."""
    pytest.importorskip("h5py", reason="the baseline needs h5py (pip install -e '.[bench]')")
    import importlib.util

    from maskbank.train.pair_sampler import PairStream
    from maskbank.train.run_config import DataConfig

    spec = importlib.util.spec_from_file_location("bench_sampler", REPO / "bench" / "sampler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stream = PairStream(phantom_bank, DataConfig(crop=32, margin=8, k=5), seed=0)
    stream.sample(0)
    assert stream._scans and stream.chunks.nbytes > 0
    bench.forget_scans(stream)
    assert not stream._scans and stream.chunks.nbytes == 0 and len(stream.chunks._chunks) == 0
    cmd = [sys.executable, str(REPO / "bench" / "sampler.py"), "--bank", phantom_bank, "--json",
           "--crop", "32", "--margin", "8", "--pairs", "3", "--baseline-pairs", "1", "--huge-bank"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["huge_bank"] is True and result["ratio"] > 0


@pytest.mark.slow
def test_sampler_bench_realistic_builds_once_then_reuses(tmp_path):
    """--realistic runs prepare + propose on synthetic CTs (tiny here), caches the bank, reuses it."""
    pytest.importorskip("h5py", reason="the baseline needs h5py (pip install -e '.[bench]')")
    cmd = [sys.executable, str(REPO / "bench" / "sampler.py"), "--realistic", "--json",
           "--realistic-source", "120", "112", "80", "--cache-dir", str(tmp_path / "cache"),
           "--crop", "24", "--margin", "4", "--k", "5", "--pairs", "2", "--baseline-pairs", "1"]  # fmt: skip
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)]
    runs.append(subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600))
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "realistic bank: synthetic-ct-0" in runs[0].stderr
    assert "realistic bank:" not in runs[1].stderr  # cached
    result = json.loads(runs[1].stdout.strip().splitlines()[-1])
    assert result["bank"] == "realistic" and result["source_shapes"] == [[120, 112, 80]] * 2
    assert result["baseline_s_per_pair_total"] > 0 and result["ratio"] > 0
    assert "volumes [" in runs[1].stderr and "s/pair" in runs[1].stderr


def test_sampler_bench_on_a_missing_bank_says_what_to_do(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "sampler.py"), "--bank", str(tmp_path / "nope")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2
    assert "error: cannot open bank" in proc.stderr and "maskbank prepare" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pair_ceiling_bench_scores_a_run_beside_the_perfect_readout(phantom_bank, tmp_path):
    from maskbank.train import pretrain
    from maskbank.train.run_config import TrainConfig

    held_out = "phantom-pet-002"
    over = ["train.progress=false", "train.tensorboard=false", "train.ckpt_every=2",
            "max_steps=2", f"data.val_scans=[{held_out}]", "train.val_pairs=2"]  # fmt: skip
    pretrain(TrainConfig.load("tiny", over), phantom_bank, tmp_path / "run")
    cmd = [sys.executable, str(REPO / "bench" / "pair_ceiling.py"), "--bank", phantom_bank,
           "--checkpoint", str(tmp_path / "run"), "--pairs", "4", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["val_scans"] == [held_out] and result["readout_level"] == 2
    overall, *bins = result["bins"]
    assert overall["bin"] == "all" and overall["tasks"] == sum(b["tasks"] for b in bins) > 0
    # Overall a finer readout reaches further (per task it need not).
    assert 1 >= overall["ceiling L1"] > overall["ceiling L2"] > overall["ceiling L3"] >= 0
    # an exact copy of what the reference shows, the most matching alone can give
    assert 1 >= overall["reference view"] >= overall["ceiling L2"]
    for row in result["bins"]:
        assert row["best threshold"] >= row["network"]  # 0.5 is one of the grid's thresholds
        assert 0 <= row["untrained"] <= 1
    assert result["network_vs_ceiling"] == pytest.approx(overall["network"] / overall["ceiling L2"])


def test_pair_ceiling_bench_without_validation_scans_says_how_to_name_them(phantom_bank):
    cmd = [sys.executable, str(REPO / "bench" / "pair_ceiling.py"), "--bank", phantom_bank,
           "--config", "tiny", "--pairs", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0 and "data.val_scans" in proc.stderr
