"""bench/sampler_scale.py end to end at smoke sizes: banks built, start-up timed, worker
memory read, temporary banks removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_sizes_give_a_row_each_with_worker_memory(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "sampler_scale.py"), "--sizes", "40",
           "--real", "3", "--workers", "1", "--batches", "1", "--rounds", "1", "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratios to the smallest bank" in proc.stdout
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["scans"] for r in out["results"]] == [3, 40]
    for row in out["results"]:
        assert row["open_list_s"] > 0 and 0 < row["first_batch_s"] <= row["startup_s"]
        (worker,) = row["workers"]
        assert 0 < worker["uss"] <= worker["pss"] <= worker["rss"]
    assert not list(tmp_path.iterdir())  # its temporary banks are gone
