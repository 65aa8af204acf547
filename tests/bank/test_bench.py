"""bench/bank_read.py still runs and reports sane figures (tiny volume, JSON output)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bank_read_bench_json() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/bank_read.py", "--shape", "96", "80", "64", "--crops", "2",
         "--nii-reps", "1", "--index-rows", "50", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    f = result["formats"]
    assert f["shape"] == [96, 80, 64] and f["chunks"] == [64, 64, 64]
    assert 0 < f["bank_bytes_per_voxel"] < 2.0 <= f["npy_bytes_per_voxel"] < 2.01  # .npy header
    assert f["bank_crop_ms"] > 0 and f["nii_gz_crop_ms"] > 0
    assert result["index"]["rows"] == 51
