"""`maskbank evaluate compare`: result folders of different kinds side by side."""

from __future__ import annotations

import json

from flows.cli import main as cli
from train.evaluation.report import write_results


def _incontext(label: str, dice: float) -> dict:
    summary = {
        "network": label,
        "shots": 1,
        "mean_dice": dice,
        "mean_hd95": 4.0,
        "mean_nsd": 0.5,
        "structures": 3,
    }
    return {"evaluation": "incontext", "summary": [summary]}


def test_compare_puts_folders_side_by_side(tmp_path, capsys):
    write_results(tmp_path / "mass", _incontext("mass@100", 0.61), "x")
    write_results(tmp_path / "scratch", _incontext("random", 0.05), "x")
    probe = {
        "evaluation": "probe",
        "target": "lesion",
        "networks": [{"network": "mass@100", "auroc": 0.9, "balanced_accuracy": 0.8}],
    }
    write_results(tmp_path / "probe", probe, "x")
    out = tmp_path / "cmp"
    folders = [str(tmp_path / n) for n in ("mass", "scratch", "probe")]
    assert cli(["evaluate", "compare", *folders, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = printed["tables"]["incontext"]
    assert [(r["folder"], r["dice"]) for r in rows] == [("mass", 0.61), ("scratch", 0.05)]
    assert printed["tables"]["probe"][0]["auroc"] == 0.9
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| mass | mass@100 | 1 | 0.610 |" in md and "Frozen-encoder probe" in md


def test_compare_names_a_folder_without_results(tmp_path, capsys):
    assert cli(["evaluate", "compare", str(tmp_path)]) == 2
    assert "results.json not found" in capsys.readouterr().err
