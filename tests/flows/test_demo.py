"""`maskbank demo`, the README's main job, end to end through the real CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from maskbank.bank import Bank
from tests.flows.cli_run import maskbank


@pytest.mark.slow
def test_demo_on_phantoms_and_rerun_skips(prefect_api: str, tmp_path: Path) -> None:
    """All stages: prepare, proposals (+ quality table), tiny pretraining, the evaluation."""
    args = ("demo", "--out", str(tmp_path), "--synthetic", "--no-progress", "--spacing", "3")
    out = maskbank(*args, "--steps", "4", timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 ok, 0 skipped, 0 failed" in out.stdout and "demo done" in out.stdout
    assert "ABO" in out.stdout and "overall" in out.stdout
    assert "pretraining loss over 4 steps" in out.stdout
    metrics = [
        json.loads(line)
        for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len([m for m in metrics if "loss" in m]) == 4
    # The left-out queries validate the pretext: a held-out pair Dice at the last step.
    assert [m["step"] for m in metrics if "val_dice" in m] == [4]
    assert "held-out pair Dice (scans left out of pretraining) by step: 4: " in out.stdout
    assert (tmp_path / "pretrain" / "checkpoints").is_dir()
    # The answer: 1-shot in-context Dice of the phantoms' organs on scans left out of
    # pretraining: pretrained, atlas registration and the untrained floor, with intervals.
    assert "1-shot in-context segmentation" in out.stdout and "phantom-ct/liver" in out.stdout
    assert "Dice [95% CI]" in out.stdout and "registration" in out.stdout
    results = json.loads((tmp_path / "evaluate" / "incontext" / "results.json").read_text())
    names = ["pretrain@4", "registration", "random"]
    assert {r["network"] for r in results["structures"]} == set(names)
    assert [n["name"] for n in results["networks"]] == names
    assert results["mean_dice"] is not None and len(results["mean_dice_ci"]) == 2
    assert results["figures"]
    queries = sorted({r["query"] for r in results["structures"]})
    assert queries == ["phantom_ct_2", "phantom_ct_3"]
    assert results["pretraining_overlap"] == []
    assert "query scan(s) were in the pretraining data" not in out.stderr
    assert "the 2 labelled scans the evaluation scores as queries are left out" in out.stdout
    record = torch.load(
        tmp_path / "pretrain" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True
    )["pretraining_scans"]
    assert {r["scan_id"] for r in record}.isdisjoint(queries) and len(record) == 3
    bank = Bank.open(tmp_path / "bank")
    assert sorted(bank.summary()["by_modality"]) == ["ct", "mr", "pet"]
    assert all(bank.scan(s).has("label") for s in bank.scan_ids)
    assert all(bank.row(s)["n_proposals"] > 50 for s in bank.scan_ids)
    assert bank.verify() == []

    again = maskbank(*args, "--until", "propose", timeout=600)
    assert again.returncode == 0 and "0 ok, 5 skipped, 0 failed" in again.stdout
    assert "pretraining" not in again.stdout


@pytest.mark.slow
@pytest.mark.realdata
def test_demo_uses_the_real_sample_scans(
    prefect_api: str, shared_data: Path, tmp_path: Path
) -> None:
    out = maskbank(
        "demo", "--out", str(tmp_path), "--no-progress", "--until", "prepare", timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    with open(tmp_path / "inputs" / "manifest.csv") as fh:
        images = [Path(r["image"]) for r in csv.DictReader(fh)]
    assert sum(p.is_absolute() and p.parent == shared_data for p in images) == 4
    bank = Bank.open(tmp_path / "bank")
    assert "ct_chest_lung1" in bank and bank.scan("ct_chest_lung1").has("label")
    assert bank.summary()["by_dataset"]["sample-real"]["scans"] == 2
    assert bank.summary()["by_dataset"]["mr-template"]["scans"] == 3
    assert bank.verify() == []
