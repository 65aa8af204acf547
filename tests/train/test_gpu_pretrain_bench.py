"""bench/gpu_pretrain.py runs its whole path (bank, budgeted pretraining, three evaluations)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import REPO

SCRIPT = REPO / "bench" / "gpu_pretrain.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_help_explains_the_budget_and_the_device_command():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--minutes" in proc.stdout and "--smoke" in proc.stdout
    assert "carry" in proc.stdout  # the wheels/scans recipe for a GPU machine is in the help


@pytest.mark.slow
def test_smoke_prints_one_json_with_finite_results(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stdout[-2000:]  # exactly one JSON object on stdout
    result = json.loads(lines[0])
    assert result == json.loads((out / "result.json").read_text())

    assert result["device"] == "cpu" and result["preset"] == "tiny"
    assert result["bank"] == {"scans": 4, "phantoms": 4, "real": []}
    # Calibration, then a resume up to the smoke cap: one contiguous metrics log.
    assert 1 <= result["calibration_steps"] <= result["steps"] == 10
    rows = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert (out / "pretrain" / "checkpoints" / "last.pt").is_file()
    assert result["loss_first"] == rows[0]["loss"] and result["loss_last"] == rows[-1]["loss"]
    for key in ("steps_per_s", "pairs_per_s", "loss_first", "loss_last"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert 0 <= result["data_wait"] <= 1

    pairs = [result["incontext"], result["probe"], *result["finetune"].values()]
    assert set(result["finetune"]) == {"0.2", "1.0"}
    assert set(result["incontext"]) == set(result["probe"]) == {"pretrained", "random"}
    assert all(set(f) == {"pretrained", "scratch"} for f in result["finetune"].values())
    for pair in pairs:
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in pair.values()), pair
    for name in ("incontext.json", "finetune.json", "probe.json"):
        assert json.loads((out / name).read_text())["evaluation"] == name.split(".")[0]

    stages = result["seconds"]
    assert set(stages) == {"bank", "pretrain", "incontext", "finetune", "probe", "total"}
    assert all(v > 0 for v in stages.values())
    assert stages["total"] >= sum(v for k, v in stages.items() if k != "total")


def _run_smoke(*extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--smoke", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_budget_spent_in_calibration_stops_at_the_deadline_with_a_checkpoint(tmp_path):
    """A budget shorter than start-up: SIGTERM after the first step, no resumed run."""
    result = _run_smoke("--minutes", "0.001", "--out", str(tmp_path))
    assert 1 <= result["steps"] == result["calibration_steps"] < 10
    assert (tmp_path / "pretrain" / "checkpoints" / "last.pt").is_file()
    assert result["budget_s"] == pytest.approx(0.06)


@pytest.mark.slow
@pytest.mark.realdata
def test_real_scans_join_the_pretraining_bank(shared_data, tmp_path):
    """--data prepares the real scans (1.5 mm, engine proposals); evaluations stay on phantoms."""
    from maskbank.bank import Bank

    result = _run_smoke("--data", str(shared_data), "--out", str(tmp_path))
    real = result["bank"]["real"]
    assert real == ["real-ct-chest", "real-ct-head", "real-mr-mni152", "real-mr-aniso"]
    assert result["bank"]["scans"] == 4 + len(real)
    bank = Bank.open(str(tmp_path / "bank"))
    for sid in real:
        scan = bank.scan(sid)
        assert scan.spacing == pytest.approx((1.5, 1.5, 1.5))
        assert scan.proposals_attrs["n_proposals"] > 0
    assert bank.scan("real-ct-chest").has("label") and not bank.scan("real-ct-head").has("label")
    incontext = json.loads((tmp_path / "incontext.json").read_text())
    assert {r["query"] for r in incontext["structures"]} <= {
        f"phantom-ct-{i:03d}" for i in range(4)
    }
