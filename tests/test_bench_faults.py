"""bench/faults.py end to end: faults drawn at seeded random moments, recovered as a user
would, must leave every scan there once and intact, and a resumed run on the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The cheapest subset that still covers a killed writer, a damaged index, a write race and
# a killed training run (one reference prepare, propose and training run between them).
FAULTS = ["kill-prepare", "corrupt-index", "concurrent-prepare", "kill-train"]


@pytest.mark.slow
def test_listed_faults_survive_every_trial(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "faults.py"), "--trials", "1", "--json",
           "--faults", ",".join(FAULTS), "--out", str(tmp_path / "work")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(proc.stdout)["faults"]}
    assert list(rows) == FAULTS
    for name, row in rows.items():
        assert {"trials", "survived", "scans_lost", "scans_damaged", "recover_s"} <= set(row)
        assert row["trials"] == 1, row
        assert (row["survived"], row["scans_lost"], row["scans_damaged"]) == (1, 0, 0), (
            f"{name}: " + "\n".join(row["problems"])
        )
        assert row["recover_s"] is not None and row["recover_s"] >= 0
    assert proc.returncode == 0
