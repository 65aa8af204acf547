"""SIGKILL a `maskbank prepare` mid-run, then re-run: the bank ends whole, each scan once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from maskbank.bank import Bank
from maskbank.pipeline.phantom import make_phantom
from tests.flows.cli_run import maskbank, popen_maskbank

N_SCANS = 6


def _published(bank: Path) -> set[str]:
    scans = bank / "scans"
    if not scans.is_dir():
        return set()
    return {p.name for p in scans.iterdir() if (p / "zarr.json").exists()}


@pytest.mark.slow
def test_killed_run_resumes_cleanly(prefect_api: str, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for i in range(N_SCANS):  # big enough (~1 s each) that the kill lands mid-batch
        make_phantom("ct", shape=(96, 96, 80), spacing=(1.5, 1.5, 1.5), seed=i).save_nifti(
            inputs, f"scan{i}"
        )
    bank = tmp_path / "bank"
    args = [str(inputs), "--bank", str(bank), "--spacing", "1.5", "--workers", "1", "--no-progress"]

    proc = popen_maskbank("prepare", *args)
    deadline = time.monotonic() + 240
    while not _published(bank) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = _published(bank)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read() if proc.stdout else ""
    assert 1 <= len(done_before) < N_SCANS, done_before

    rerun = maskbank("prepare", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{N_SCANS - len(done_before)} ok, {len(done_before)} skipped, 0 failed" in rerun.stdout

    opened = Bank.open(bank)
    assert opened.scan_ids == [f"scan{i}" for i in range(N_SCANS)]
    assert sorted(p.name for p in (bank / "scans").iterdir() if p.is_dir()) == opened.scan_ids
    assert not any((bank / ".staging").iterdir())  # no half-written copy left behind
    assert opened.verify() == []
    assert maskbank("verify", str(bank)).returncode == 0
