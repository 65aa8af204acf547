"""One bad scan fails alone, memory included: hostile files end as report rows, not OOM kills."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

from maskbank.bank import Bank
from tests.flows.cli_run import DECODE, ENV, MASKBANK, REPO
from tests.flows.scans import write_gzip_bomb, write_huge_grid, write_phantom

RSS_BOUND_KIB = 2 << 20  # 2 GiB: the bomb alone decompresses to 2.5 GiB
PEAK_OF_CHILD = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(f'peak_rss_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', "
    "file=sys.stderr); sys.exit(rc)"
)


def _id(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_prepare_good_bomb_hugegrid_fails_the_two_alone(prefect_api: str, tmp_path: Path) -> None:
    """One CLI run (they are slow on small machines) also checks --id-from hash: ids are
    content hashes and no file or folder name reaches the bank."""
    good, _ = write_phantom(tmp_path / "Doe Jane", "Doe_Jane_1970", seed=3)
    bomb = write_gzip_bomb(tmp_path / "in" / "bomb.nii.gz")
    huge = write_huge_grid(tmp_path / "in" / "hugegrid.nii.gz")
    assert bomb.stat().st_size < 8 << 20
    args = [str(good), str(bomb), str(huge), "--bank", str(tmp_path / "bank"), "--workers", "2"]
    args += ["--id-from", "hash", "--json", "--no-progress"]
    # Through a fresh parent whose only child is this run: its RUSAGE_CHILDREN peak is this
    # run's (the test process's own would include every earlier test's subprocesses).
    out = subprocess.run(
        [sys.executable, "-c", PEAK_OF_CHILD, *MASKBANK, "prepare", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        **DECODE,
        timeout=300,
    )
    children_peak_kib = int(re.search(r"peak_rss_kib=(\d+)", out.stderr).group(1))
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    rows = {r["scan_id"]: r for r in report["scans"]}
    assert rows[_id(good)]["status"] == "ok"
    assert rows[_id(bomb)]["status"] == "failed" and "gzip bomb" in rows[_id(bomb)]["reason"]
    assert rows[_id(huge)]["status"] == "failed" and "200" in rows[_id(huge)]["reason"]
    # The report names no file or folder either: ids stand for them.
    assert "file" not in rows[_id(huge)] and "Doe" not in json.dumps(report)
    assert not any("worker" in r for r in report["scans"])  # host:pid of each task
    assert str(tmp_path / "in") not in json.dumps(report)
    bank = Bank.open(tmp_path / "bank")
    assert bank.scan_ids == [_id(good)]
    attrs = bank.scan(_id(good)).attrs
    assert "Doe" not in json.dumps(attrs) and attrs["dataset"] == "default"
    assert attrs["config"]["max_scan_memory"] > 0  # derived from this machine and --workers
    # every child this test process has waited for, the run included
    assert 0 < children_peak_kib < RSS_BOUND_KIB, f"peak RSS {children_peak_kib / 1024:.0f} MiB"
