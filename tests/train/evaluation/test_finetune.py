"""`maskbank evaluate finetune` end to end on a labelled phantom bank, and its bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from flows.cli import main
from flows.demo_bank import _normalise

from .conftest import SHAPE, write_labelled_phantoms


def test_pretrained_and_scratch_fine_tune_on_one_split(
    labelled_bank, tiny_checkpoint, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    argv = [
        "evaluate", "finetune", "--checkpoint", str(tiny_checkpoint), "--bank", labelled_bank,
        "--fractions", "0.5,1.0", "--steps", "3", "--val-every", "2", "--batch-size", "1",
        "--out", str(out), "--json", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "results.json").read_text())
    assert printed["split"] == saved["split"]
    assert (out / "dice_vs_fraction.png").stat().st_size > 1000
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| fraction | train scans | pretrained | scratch |" in md

    split = saved["split"]
    assert saved["fractions"] == [0.5, 1.0]
    assert set(split["fractions"]["0.5"]) < set(split["fractions"]["1"]) == set(split["train"])
    assert saved["run"]["bank"]["fingerprint"] and saved["run"]["command"][:3] == [
        "maskbank", "evaluate", "finetune"
    ]  # fmt: skip
    assert (
        saved["networks"]["pretrained"]["sha256"]
        and saved["networks"]["scratch"]["weights"] == "random"
    )

    runs = saved["runs"]
    assert [(r["network"], r["fraction"]) for r in runs] == [
        ("pretrained", 0.5), ("scratch", 0.5), ("pretrained", 1.0), ("scratch", 1.0)
    ]  # fmt: skip
    for r in runs:
        assert math.isfinite(r["test"]["mean_dice"]) and 0 <= r["test"]["mean_dice"] <= 1
        assert r["best_step"] in (0, 2, 3) and math.isfinite(r["val_dice"])
        assert [p["step"] for p in r["val_curve"]] == [0, 2, 3]
        assert r["seconds"] > 0
        for c in r["test"]["classes"].values():
            assert {"dice", "hd95", "nsd"} <= set(c) and c["scans"] >= 1
        # Test scans are read by the final scoring only; selection sees validation only.
        reads = r["reads"]
        fraction_ids = split["fractions"][f"{r['fraction']:g}"]
        assert reads["train"] and set(reads["train"]) <= set(fraction_ids)
        assert set(reads["init"]) <= set(fraction_ids)
        assert reads["validation"] == split["validation"]
        assert reads["test"] == split["test"]
        assert r["train_scans"] == fraction_ids
    # Same budget and data for both networks; only the initial weights differ.
    for a, b in ((runs[0], runs[1]), (runs[2], runs[3])):
        assert a["reads"] == b["reads"] and a["steps"] == b["steps"] and a["lr"] == b["lr"]
        assert a["train_scans"] == b["train_scans"] and math.isfinite(a["final_loss"])


def _unlabelled_bank(path: Path) -> str:
    from bank import Bank
    from pipeline.phantom import make_phantom

    bank = Bank.create(path)
    ph = make_phantom("ct", shape=SHAPE, spacing=(2.0, 2.0, 2.0), seed=0)
    attrs = {
        "dataset": "phantom-ct",
        "modality": "ct",
        "spacing": list(ph.spacing),
        "affine": ph.affine.tolist(),
        "source_path": "phantom://ct/0",
        "source_sha256": "phantom-ct-0",
        "fingerprint": "phantom",
    }
    image = _normalise(ph.image, ph.body).astype(np.float32)
    bank.write_scan("ct-00", {"image": image, "body": ph.body}, attrs)
    return str(path)


def _fails(capsys, argv: list[str], pattern: str) -> None:
    assert main(["evaluate", "finetune", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("maskbank evaluate finetune: error:") and pattern in err, err


def test_bad_inputs_exit_2_with_one_line(labelled_bank, tmp_path, capsys) -> None:
    scratch = ["--checkpoint", "scratch", "--preset", "tiny"]
    _fails(capsys, [*scratch, "--bank", _unlabelled_bank(tmp_path / "u")], "no scan with a label")
    _fails(capsys, [*scratch, "--bank", labelled_bank, "--fractions", "0.5,1.5"], "outside (0, 1]")
    _fails(capsys, [*scratch, "--bank", labelled_bank, "--fractions", "x"], "--fractions")
    missing = str(tmp_path / "nope.pt")
    _fails(capsys, ["--checkpoint", missing, "--bank", labelled_bank], "does not exist")
    two = write_labelled_phantoms(tmp_path / "two", n=2)
    _fails(capsys, [*scratch, "--bank", two], ">= 3 labelled scans")
