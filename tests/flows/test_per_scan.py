"""The per-scan task policy every flow shares: the outcome record, the runner, the report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow

from maskbank.flows.per_scan import (
    TASK_RETRIES,
    Cluster,
    RunClock,
    ScanOutcome,
    count_statuses,
    crashed,
    per_scan_task,
    run_per_scan,
    run_report,
)
from maskbank.pipeline.errors import ScanError

REPO = Path(__file__).resolve().parents[2]


def test_outcome_is_its_report_row() -> None:
    outcome = ScanOutcome("a", "ok", seconds=1.5, details={"n_proposals": 7})
    row = outcome.to_json()
    assert row == {
        "scan_id": "a",
        "status": "ok",
        "reason": None,
        "seconds": 1.5,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "n_proposals": 7,
    }
    assert json.loads(json.dumps(row)) == row
    assert outcome["n_proposals"] == 7 and outcome.get("note") is None and dict(outcome) == row
    more = outcome.with_details(note="new")
    assert more["note"] == "new" and "note" not in outcome  # frozen: a new record


def test_crashed_tasks_say_why_and_whether_they_were_retried() -> None:
    io = crashed("a", OSError(5, "Input/output error"), file="/x.nii")
    assert io.status == "failed" and io.seconds is None and io["file"] == "/x.nii"
    assert f"gave up after {TASK_RETRIES} retries" in io.reason
    bad = crashed("b", ScanError("x.nii", "bad header"))
    assert "retries" not in bad.reason and "bad header" in bad.reason
    assert crashed("c", None).reason == "task failed"
    assert count_statuses([io, bad, ScanOutcome("d", "ok")]) == {
        "ok": 1,
        "skipped": 0,
        "failed": 2,
    }


def test_cluster_shares_torch_threads_only_in_this_process() -> None:
    import torch

    before = torch.get_num_threads()
    threads = Cluster(workers=max(1, (os.cpu_count() or 1)))
    with threads.shared_torch_threads():
        assert torch.get_num_threads() == threads.threads_per_task == 1
    assert torch.get_num_threads() == before
    with Cluster(workers=64, processes=True).shared_torch_threads():
        assert torch.get_num_threads() == before  # process workers: OMP_NUM_THREADS instead


@per_scan_task("echo")
def echo_one(scan_id: str, delay: float) -> ScanOutcome:
    """Finishes after ``delay`` seconds; a negative delay is a crash."""
    import time

    if delay < 0:
        raise ValueError(f"{scan_id} broke")
    time.sleep(delay)
    return ScanOutcome(scan_id, "ok", details={"delay": delay})


def test_runner_keeps_the_given_order_and_reports_crashes(prefect_api: str) -> None:
    delays = {"slow": 0.6, "crash": -1.0, "fast": 0.0}
    params = {sid: {"scan_id": sid, "delay": d} for sid, d in delays.items()}
    clock = RunClock()

    @flow(name="echo-bank")
    def echo_bank() -> list[ScanOutcome]:
        crash_details = {"crash": {"file": "crash.nii"}}
        cluster = Cluster(workers=3)
        return run_per_scan(echo_one, params, cluster, "echo", False, crash_details)

    outcomes = echo_bank()
    assert [o.scan_id for o in outcomes] == ["slow", "crash", "fast"]
    crash = outcomes[1]
    assert crash.status == "failed" and "ValueError: crash broke" in crash.reason
    assert crash["file"] == "crash.nii"
    report = run_report("echo", "/bank", clock, {"config": {"k": 1}}, outcomes)
    assert report["counts"] == {"ok": 2, "skipped": 0, "failed": 1}
    assert report["config"] == {"k": 1} and report["seconds"] >= 0.6
    assert [r["scan_id"] for r in report["scans"]] == ["slow", "crash", "fast"]
    assert json.loads(json.dumps(report)) == report


@pytest.mark.parametrize("module", ["maskbank.flows.prepare", "maskbank.flows.propose"])
def test_flows_share_machinery_without_importing_each_other(module: str) -> None:
    prepare, propose = "maskbank.flows.prepare", "maskbank.flows.propose"
    other = {prepare: propose, propose: prepare}[module]
    probe = f"import sys, {module}; print({other!r} in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
