"""Frozen-encoder probe: metrics against hand-computed cases, folds, the head, the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from maskbank.flows.cli import main
from maskbank.train.evaluation.checkpoint import load_network
from maskbank.train.evaluation.errors import EvaluationError
from maskbank.train.evaluation.probe import (
    ProbeSettings,
    ProbeTarget,
    balanced_accuracy,
    binary_auroc,
    fit_predict,
    macro_auroc,
    plan_folds,
    roc_points,
    scan_tokens,
    stratified_folds,
)

from .conftest import write_labelled_phantoms

# ------------------------------------------------------------------ metrics by hand


def test_binary_auroc_hand_computed() -> None:
    # positives 0.8, 0.4; negatives 0.6, 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) -> 3/4
    assert binary_auroc([1, 1, 0, 0], [0.8, 0.4, 0.6, 0.2]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts half: pairs 1, 1, 0.5, 1 -> 3.5/4
    assert binary_auroc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.875)
    assert binary_auroc([1, 0, 1, 0], [0.9, 0.1, 0.7, 0.3]) == 1.0
    assert binary_auroc([1, 0, 1, 0], [0.1, 0.9, 0.3, 0.7]) == 0.0
    assert binary_auroc([1, 0], [0.5, 0.5]) == 0.5
    assert math.isnan(binary_auroc([1, 1], [0.2, 0.3]))


def test_macro_auroc_and_balanced_accuracy_hand_computed() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.3, 0.4, 0.3],  # class 0 scored below class-1 scan 3 -> class-0 AUROC 7/8
            [0.1, 0.8, 0.1],
            [0.4, 0.5, 0.1],
            [0.1, 0.1, 0.8],
            [0.2, 0.2, 0.6],
        ]
    )
    # class 0: positives 0.7, 0.3 vs negatives 0.1, 0.4, 0.1, 0.2 -> (4 + 3) / 8
    # class 1: positives 0.8, 0.5 vs 0.2, 0.4, 0.1, 0.2 -> 8/8; class 2: 8/8
    assert macro_auroc(y, probs) == pytest.approx((7 / 8 + 1 + 1) / 3)
    # binary: the AUROC of class 1's probability
    assert macro_auroc(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])) == 1.0
    # recalls: class 0 1/2, class 1 2/2, class 2 1/2 -> 2/3, however imbalanced
    assert balanced_accuracy(y, np.array([0, 1, 1, 1, 2, 0])) == pytest.approx(2 / 3)
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == pytest.approx(0.5)


def test_roc_points_hand_computed() -> None:
    fpr, tpr = roc_points([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]


# ------------------------------------------------------------------ folds


def test_stratified_folds_hold_every_class_and_every_scan_once() -> None:
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    folds = stratified_folds(y, 3, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(y.size))
    for test in folds:
        assert set(y[test].tolist()) == {0, 1, 2}
        assert abs(test.size - y.size / 3) <= 1
    assert all((a == b).all() for a, b in zip(folds, stratified_folds(y, 3, seed=1), strict=True))


def test_plan_folds_reduces_or_refuses() -> None:
    values = {"a": "x", "b": "x", "c": "y", "d": "y", "e": "y"}
    assert plan_folds(ProbeTarget("t", "metadata", values, ["x", "y"]), 2) == (2, [])
    n, warnings = plan_folds(ProbeTarget("t", "metadata", values, ["x", "y"]), 5)
    assert n == 2 and "'x' has only 2" in warnings[0]
    lonely = {**values, "f": "z"}
    with pytest.raises(EvaluationError, match=r"fewer than 2 scans \('z': f\)"):
        plan_folds(ProbeTarget("t", "metadata", lonely, ["x", "y", "z"]), 5)
    with pytest.raises(EvaluationError, match="one class only"):
        plan_folds(ProbeTarget("t", "metadata", {"a": "x", "b": "x"}, ["x"]), 2)


# ------------------------------------------------------------------ features and head


def test_scan_tokens_cover_the_padded_scan_with_the_frozen_encoder() -> None:
    net = load_network("random", "tiny", seed=0)
    before = {k: v.clone() for k, v in net.model.state_dict().items()}
    rng = np.random.default_rng(0)
    window = rng.normal(size=(32, 32, 32)).astype(np.float32)
    tokens = scan_tokens(net.model, window, net.crop)
    with torch.no_grad():
        deepest = net.model.encoder(torch.from_numpy(window)[None, None])[-1]
    assert tokens.shape == (4**3, 32)  # one window, (32/8)^3 voxels of 32 channels
    expect = deepest[0].flatten(1).T.to(torch.float16)
    assert torch.allclose(tokens.float(), expect.float(), atol=1e-2)
    # 48x48x40 pads to 2x2x2 windows
    assert scan_tokens(
        net.model, rng.normal(size=(48, 48, 40)), net.crop, window_batch=3
    ).shape == (
        8 * 64,
        32,
    )
    after = net.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_head_finds_the_few_tokens_that_carry_the_class() -> None:
    """Class c > 0 scans hold 4 of ~25 tokens with channel c high: pooling must find them."""
    rng = np.random.default_rng(0)

    def scan(label: int) -> torch.Tensor:
        t = rng.normal(size=(int(rng.integers(20, 30)), 8)).astype(np.float32)
        if label:
            t[:4, label] += 8.0
        return torch.from_numpy(t).to(torch.float16)

    y_train = np.array([0, 1, 2] * 7)
    y_test = np.array([0, 1, 2] * 3)
    probs = fit_predict(
        [scan(c) for c in y_train],
        y_train,
        [scan(c) for c in y_test],
        3,
        ProbeSettings(),
        seed=0,
    )
    assert probs.shape == (9, 3) and np.allclose(probs.sum(1), 1.0)
    assert macro_auroc(y_test, probs) == 1.0
    assert balanced_accuracy(y_test, probs.argmax(1)) == 1.0


# ------------------------------------------------------------------ the command


def _check_outputs(out: Path, target: str, n_networks: int) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["target"] == target
    assert results["classes"] in (["absent", "present"], ["no", "yes"])
    assert len(results["networks"]) == n_networks
    for net in results["networks"]:
        for key in ("auroc", "balanced_accuracy"):
            assert 0.0 <= net[key] <= 1.0
            assert 0.0 <= net[f"{key}_std"] <= 0.5
        assert len(net["folds"]) == results["folds_used"]
        assert sorted(p["scan"] for p in net["predictions"]) == sorted(
            s for f in results["splits"] for s in f["test"]
        )
    md = (out / "results.md").read_text(encoding="utf-8")
    assert all(f"| {n['network']} |" in md for n in results["networks"])
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"
    return results


def test_probe_command_metadata_target_with_checkpoint(
    tiny_checkpoint, labelled_bank, tmp_path, capsys
) -> None:
    bank = labelled_bank
    out = tmp_path / "out"
    argv = ["evaluate", "probe", "--checkpoint", str(tiny_checkpoint), "--bank", bank]
    argv += ["--target", "lesion", "--folds", "2", "--epochs", "5", "--out", str(out)]
    assert main([*argv, "--no-progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = _check_outputs(out, "lesion", 2)
    assert results["classes"] == ["no", "yes"] and results["class_counts"] == {"no": 2, "yes": 2}
    assert results["folds_used"] == 2 and results["warnings"] == []
    assert [n["network"] for n in printed["networks"]][1] == "random"
    assert printed["networks"][0]["network"].endswith("@4")
    for key in ("network", "auroc", "auroc_std", "balanced_accuracy", "balanced_accuracy_std"):
        assert key in printed["networks"][0]
    assert results["run"]["networks"][0]["sha256"]
    # the same folds for both networks; every test fold holds both classes
    for split in results["splits"]:
        assert {int(s[-2:]) % 2 for s in split["test"]} == {0, 1}


def test_probe_command_label_target_reduces_folds(labelled_bank, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["evaluate", "probe", "--checkpoint", "random", "--bank", labelled_bank]
    argv += ["--target", "has:lesion", "--epochs", "5", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "--folds 5 reduced to 2" in captured.err
    assert "random" in captured.out and "AUROC" in captured.out
    results = _check_outputs(out, "has:lesion", 1)
    # seeds 1 and 3 hold lesions
    truth = {p["scan"]: p["target"] for p in results["networks"][0]["predictions"]}
    assert truth == {"ct-00": "absent", "ct-01": "present", "ct-02": "absent", "ct-03": "present"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "diagnosis"], "no scan has the metadata column 'diagnosis'"),
        (["--target", "has:tumour"], "no label class named 'tumour'"),
        (["--target", "lesion", "--checkpoint", "/no/such.pt"], "does not exist"),
    ],
)
def test_probe_command_errors(labelled_bank, capsys, extra, message) -> None:
    argv = ["evaluate", "probe", "--checkpoint", "random", "--bank", labelled_bank]
    assert main([*argv, *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_probe_command_names_scans_missing_the_target(tmp_path, capsys) -> None:
    from maskbank.bank import Bank

    path = write_labelled_phantoms(tmp_path / "bank", n=3)
    bank = Bank.open(path, mode="a")
    scan = bank.scan("ct-02")
    arrays = {name: np.asarray(scan.read(name)) for name in ("image", "body", "label")}
    attrs = {k: v for k, v in scan.attrs.items() if k != "maskbank"}
    bank.write_scan("ct-02", arrays, {**attrs, "metadata": {"other": "1"}})
    argv = ["evaluate", "probe", "--checkpoint", "random", "--bank", path, "--target", "lesion"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'lesion' is missing in 1 scan(s): ct-02" in err and "--scans" in err
