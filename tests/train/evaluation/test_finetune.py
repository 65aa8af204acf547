"""Fine-tuning: the recipe (AdamW, a learning-rate grid chosen on validation), split seeds,
the headline statistic, and `maskbank evaluate finetune` end to end with its bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from maskbank.flows.cli import main
from maskbank.flows.commands.evaluate import finetune as finetune_cli
from maskbank.flows.demo_bank import _normalise
from maskbank.train.evaluation import finetune
from maskbank.train.evaluation.aggregate import headline
from maskbank.train.evaluation.errors import EvaluationError
from maskbank.train.evaluation.finetune import LR_GRID, FinetuneOptions

from .conftest import SHAPE, write_labelled_phantoms


def test_pretrained_and_scratch_fine_tune_on_one_split(
    labelled_bank, tiny_checkpoint, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    argv = [
        "evaluate", "finetune", "--checkpoint", str(tiny_checkpoint), "--bank", labelled_bank,
        "--fractions", "0.5,1.0", "--steps", "2", "--val-every", "1", "--batch-size", "1",
        "--lr-grid", "1e-3", "--out", str(out), "--json", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "results.json").read_text())
    assert printed["split"] == saved["split"] == saved["splits"][0]
    assert (out / "dice_vs_fraction.png").stat().st_size > 1000
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| fraction | train scans | pretrained | scratch | pretrained lr | scratch lr |" in md
    assert "adamw" in md and "| lr 0.001 | chosen |" in md and "## Per dataset" in md
    assert "one split, seed 0: no spread" in md

    split = saved["split"]
    assert saved["fractions"] == [0.5, 1.0] and saved["split_seeds"] == [0]
    assert set(split["fractions"]["0.5"]) < set(split["fractions"]["1"]) == set(split["train"])
    assert saved["run"]["bank"]["fingerprint"] and saved["run"]["command"][:3] == [
        "maskbank", "evaluate", "finetune"
    ]  # fmt: skip
    assert (
        saved["networks"]["pretrained"]["sha256"]
        and saved["networks"]["scratch"]["weights"] == "random"
    )
    assert saved["optim"]["name"] == "adamw" and saved["optim"]["lr_grid"] == [1e-3]

    runs = saved["runs"]
    assert [(r["network"], r["fraction"]) for r in runs] == [
        ("pretrained", 0.5), ("scratch", 0.5), ("pretrained", 1.0), ("scratch", 1.0)
    ]  # fmt: skip
    for r in runs:
        assert math.isfinite(r["test"]["mean_dice"]) and 0 <= r["test"]["mean_dice"] <= 1
        assert r["optimizer"] == "adamw" and r["lr"] == 1e-3 and r["split_seed"] == 0
        assert r["best_step"] in (0, 1, 2) and math.isfinite(r["val_dice"])
        assert [p["step"] for p in r["val_curve"]] == [0, 1, 2]
        assert r["seconds"] > 0
        for c in r["test"]["classes"].values():
            assert {"dice", "hd95", "asd", "nsd"} <= set(c) and c["scans"] >= 1
        # Test scans are read by the final scoring only; selection sees validation only.
        reads = r["reads"]
        fraction_ids = split["fractions"][f"{r['fraction']:g}"]
        assert reads["train"] and set(reads["train"]) <= set(fraction_ids)
        assert set(reads["init"]) <= set(fraction_ids)
        assert reads["validation"] == split["validation"]
        assert reads["test"] == split["test"]
        assert r["read_counts"]["test"] == len(split["test"])  # scored once
        assert r["train_scans"] == fraction_ids
    # Same budget and data for both networks; only the initial weights differ.
    for a, b in ((runs[0], runs[1]), (runs[2], runs[3])):
        assert a["reads"] == b["reads"] and a["steps"] == b["steps"]
        assert a["lr_grid"] == b["lr_grid"] and a["read_counts"] == b["read_counts"]
        assert a["train_scans"] == b["train_scans"] and math.isfinite(a["final_loss"])


@pytest.fixture(scope="module")
def grid_results(labelled_bank, tiny_checkpoint) -> dict:
    """Pretrained vs scratch, two rates, two split seeds, one step each (a tiny budget)."""
    from maskbank.bank import Bank
    from maskbank.train.evaluation.checkpoint import SCRATCH, load_network

    pre = load_network(str(tiny_checkpoint))
    scratch = load_network(SCRATCH, pre.preset, 0)
    scratch.crop = pre.crop
    options = FinetuneOptions(
        fractions=(1.0,),
        steps=1,
        val_every=1,
        batch_size=1,
        lr_grid=(1e-2, 1e-4),  # sorted on the way in
        split_seeds=(0, 2),  # seed 1 happens to split these four scans as seed 0 does
    )
    # unnamed networks are 'pretrained' (a checkpoint) and 'scratch' (untrained)
    result = finetune.run(Bank.open(labelled_bank), [pre, scratch], options)
    assert list(result["networks"]) == ["pretrained", "scratch"]
    return result.data


def test_each_network_picks_its_rate_on_validation_from_the_same_grid(grid_results) -> None:
    runs = grid_results["runs"]
    assert grid_results["optim"]["name"] == "adamw"
    assert grid_results["optim"]["lr_grid"] == [1e-4, 1e-2]
    assert len(runs) == 4  # 2 seeds x 1 fraction x 2 networks
    for r in runs:
        assert r["optimizer"] == "adamw" and r["lr_grid"] == [1e-4, 1e-2]
        search = r["lr_search"]
        assert [c["lr"] for c in search] == [1e-4, 1e-2]
        # Each rate trains from the same start: step 0 validates the same weights.
        assert search[0]["val_curve"][0] == search[1]["val_curve"][0]
        for c in search:
            assert c["val_dice"] == max(p["val_dice"] for p in c["val_curve"])
        # The chosen rate is the best validation score (ties: the smaller rate) ...
        vals = [c["val_dice"] for c in search]
        assert r["lr"] == search[int(np.argmax(vals))]["lr"]
        assert (
            r["val_dice"] == max(vals)
            and r["best_step"] == search[vals.index(max(vals))]["best_step"]
        )
        # ... and the test scans were read once per test scan, after the search.
        assert r["read_counts"]["test"] == len(r["reads"]["test"])
        assert not set(r["reads"]["test"]) & set(r["reads"]["validation"] + r["reads"]["train"])
    # Both networks of a split got the same grid, steps and data.
    for a, b in ((runs[0], runs[1]), (runs[2], runs[3])):
        assert (a["network"], b["network"]) == ("pretrained", "scratch")
        assert a["split_seed"] == b["split_seed"]
        assert a["lr_grid"] == b["lr_grid"] and a["steps"] == b["steps"]
        assert a["reads"] == b["reads"] and a["read_counts"] == b["read_counts"]


def test_split_seeds_are_aggregated_as_mean_and_sd(grid_results) -> None:
    runs = grid_results["runs"]
    assert grid_results["split_seeds"] == [0, 2]
    assert [s["seed"] for s in grid_results["splits"]] == [0, 2]
    assert grid_results["splits"][0]["test"] != grid_results["splits"][1]["test"]
    assert [r["split_seed"] for r in runs] == [0, 0, 2, 2]
    summary = {(s["network"], s["fraction"]): s for s in grid_results["summary"]}
    assert set(summary) == {("pretrained", 1.0), ("scratch", 1.0)}
    for (network, _), s in summary.items():
        per_seed = [r["test"]["mean_dice"] for r in runs if r["network"] == network]
        assert s["split_seeds"] == [0, 2] and list(s["per_seed"].values()) == per_seed
        assert s["mean_dice"] == pytest.approx(np.mean(per_seed))
        assert s["sd_dice"] == pytest.approx(np.std(per_seed, ddof=1))
        assert set(s["lr"]) == {"0", "2"}


def test_test_headline_is_the_mean_over_datasets_of_class_means(grid_results) -> None:
    for r in grid_results["runs"]:
        test = r["test"]
        cases = test["cases"]
        assert cases and {c["scan"] for c in cases} == set(r["reads"]["test"])
        head = headline(cases)  # the in-context evaluation's statistic
        assert test["mean_dice"] == pytest.approx(head["mean"])
        assert test["datasets"]["phantom-ct"]["dice"] == pytest.approx(
            head["datasets"]["phantom-ct"]
        )
        by_class = {}
        for c in cases:
            by_class.setdefault(c["class"], []).append(c["dice"])
        assert test["mean_dice"] == pytest.approx(np.mean([np.mean(v) for v in by_class.values()]))
        assert test["micro_dice"] == pytest.approx(np.mean([c["dice"] for c in cases]))


def test_options_validate_the_grid_and_the_seeds() -> None:
    assert FinetuneOptions().lr_grid == LR_GRID == (3e-4, 1e-3, 3e-3)
    assert finetune_cli.parse_lr_grid(finetune_cli.LR_GRID) == LR_GRID  # the CLI's default
    assert FinetuneOptions(lr_grid=(3e-3, 1e-4)).lr_grid == (1e-4, 3e-3)
    for bad in ((), (0.0,), (-1e-3,), (float("nan"),), (1e-3, 1e-3)):
        with pytest.raises(EvaluationError, match="--lr-grid"):
            FinetuneOptions(lr_grid=bad)
    for bad_seeds in ((), (-1,), (0, 0)):
        with pytest.raises(EvaluationError, match="--split-seeds"):
            FinetuneOptions(split_seeds=bad_seeds)
    recipe = FinetuneOptions(lr_grid=(1e-3,)).recipe()
    assert recipe["name"] == "adamw" and recipe["lr_grid"] == [1e-3]


def _unlabelled_bank(path: Path) -> str:
    from maskbank.bank import Bank
    from maskbank.pipeline.phantom import make_phantom

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
    _fails(capsys, [*scratch, "--bank", labelled_bank, "--lr-grid", "fast"], "--lr-grid")
    _fails(capsys, [*scratch, "--bank", labelled_bank, "--lr-grid", "0,1e-3"], "--lr-grid")
    _fails(capsys, [*scratch, "--bank", labelled_bank, "--split-seeds", "0,x"], "--split-seeds")
    _fails(capsys, [*scratch, "--bank", labelled_bank, "--split-seeds", "1,1"], "--split-seeds")
