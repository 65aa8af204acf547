"""`maskbank evaluate compare`: result folders side by side, refused when not comparable."""

from __future__ import annotations

import json

from maskbank.flows.cli import main as cli
from maskbank.train.evaluation.report import write_results

CLASSES = [{"dataset": "ds", "value": 3, "class": "liver"}]
OPTIONS = {"shots": [1], "references": "fixed", "tolerance_mm": 2.0}


def _incontext(label: str, dice: float, fingerprint: str = "f1", **changes) -> dict:
    summary = {
        "network": label,
        "shots": 1,
        "mean_dice": dice,
        "mean_dice_ci": [dice - 0.1, dice + 0.1],
        "mean_hd95": 4.0,
        "mean_asd": 1.0,
        "mean_nsd": 0.5,
        "structures": 3,
        "classes_scored": 1,
    }
    return {
        "evaluation": "incontext",
        "summary": [summary],
        "options": changes.get("options", OPTIONS),
        "classes": changes.get("classes", CLASSES),
        "run": {"bank": {"location": "b", "fingerprint": fingerprint}},
    }


def test_compare_puts_folders_side_by_side(tmp_path, capsys):
    write_results(tmp_path / "mass", _incontext("mass@100", 0.61), "x")
    write_results(tmp_path / "scratch", _incontext("random", 0.05), "x")
    probe = {
        "evaluation": "probe",
        "target": "lesion",
        "networks": [{"network": "mass@100", "auroc": 0.9, "balanced_accuracy": 0.8}],
        "run": {"bank": {"location": "b", "fingerprint": "f1"}},
    }
    write_results(tmp_path / "probe", probe, "x")
    out = tmp_path / "cmp"
    folders = [str(tmp_path / n) for n in ("mass", "scratch", "probe")]
    assert cli(["evaluate", "compare", *folders, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = printed["tables"]["incontext"]
    assert [(r["folder"], r["dice"]) for r in rows] == [("mass", 0.61), ("scratch", 0.05)]
    assert rows[0]["dice CI"] == "[0.510, 0.710]" and printed["differences"] == []
    assert printed["tables"]["probe"][0]["auroc"] == 0.9
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| mass | mass@100 | 1 | 0.610 | [0.510, 0.710] |" in md
    assert "Frozen-encoder probe" in md


def test_compare_refuses_other_banks_options_or_classes(tmp_path, capsys):
    write_results(tmp_path / "a", _incontext("a@1", 0.6), "x")
    write_results(tmp_path / "bank", _incontext("b@1", 0.5, fingerprint="f2"), "x")
    write_results(tmp_path / "opts", _incontext("c@1", 0.5, options={**OPTIONS, "shots": [3]}), "x")
    other = [*CLASSES, {"dataset": "ds", "value": 4, "class": "spleen"}]
    write_results(tmp_path / "cls", _incontext("d@1", 0.5, classes=other), "x")
    base = ["evaluate", "compare", str(tmp_path / "a")]

    assert cli([*base, str(tmp_path / "bank")]) == 2
    err = capsys.readouterr().err
    assert "not comparable" in err and "bank fingerprint: " in err and "f1 vs" in err
    assert "--force" in err
    assert cli([*base, str(tmp_path / "opts")]) == 2
    assert "option shots: " in capsys.readouterr().err
    assert cli([*base, str(tmp_path / "cls")]) == 2
    assert "/cls: ['ds/spleen']" in capsys.readouterr().err

    argv = [*base, str(tmp_path / "bank"), str(tmp_path / "cls"), "--force", "--json"]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert len(printed["differences"]) == 2 and len(printed["tables"]["incontext"]) == 3
    assert "compared despite a difference: bank fingerprint" in captured.err


def test_compare_names_a_folder_without_results(tmp_path, capsys):
    assert cli(["evaluate", "compare", str(tmp_path)]) == 2
    assert "results.json not found" in capsys.readouterr().err


def test_the_bank_fingerprint_sees_label_maps_and_names(tmp_path):
    from maskbank.bank import Bank
    from maskbank.train.evaluation.report import evaluation_fingerprint
    from maskbank.train.pair_sampler import bank_fingerprint
    from tests.train.evaluation.conftest import write_labelled_phantoms

    def rename(seed: int, arrays: dict, attrs: dict) -> None:
        if seed == 1:
            attrs["label_names"]["3"] = "hepar"

    def relabel(seed: int, arrays: dict, attrs: dict) -> None:
        if seed == 1:
            label = arrays["label"].copy()
            label[label == 4] = 3  # the spleen labelled as liver
            arrays["label"] = label

    banks = {
        name: Bank.open(write_labelled_phantoms(tmp_path / name, n=2, edit=edit))
        for name, edit in (("a", None), ("b", None), ("names", rename), ("labels", relabel))
    }
    prints = {name: evaluation_fingerprint(b) for name, b in banks.items()}
    assert prints["a"] == prints["b"]
    assert prints["names"] != prints["a"] and prints["labels"] != prints["a"]
    # the pretraining fingerprint alone would not tell these banks apart
    assert bank_fingerprint(banks["names"]) == bank_fingerprint(banks["a"])
