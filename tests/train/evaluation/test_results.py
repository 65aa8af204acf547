"""The library call shape: ``run(bank, networks, options) -> Result`` and its outputs.

Each evaluation is ``plan`` -> ``score`` -> ``summarise``; the result gives its tables
(``markdown``, ``text``), ``json`` and ``figures(out)``, and ``write(out)`` makes the
folder the ``maskbank evaluate`` commands make.
"""

from __future__ import annotations

import json
import math

import pytest

from maskbank.bank import Bank
from maskbank.train.evaluation import finetune, incontext, probe
from maskbank.train.evaluation.checkpoint import load_network, load_with_baseline
from maskbank.train.evaluation.errors import EvaluationError
from maskbank.train.evaluation.finetune_report import FIGURE, FinetuneResult
from maskbank.train.evaluation.result import Result

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def incontext_result(labelled_bank):
    nets = [load_network("random", "tiny", seed=3)]
    options = incontext.InContextOptions(bootstrap=50, max_figures=2)
    return incontext.run(Bank.open(labelled_bank), nets, options, command=["python", "x.py"])


def test_incontext_run_returns_a_result_of_the_three_steps(labelled_bank, incontext_result):
    res = incontext_result
    assert isinstance(res, incontext.InContextResult) and isinstance(res, Result)
    assert res["mean_dice"] == res.data["mean_dice"] and "structures" in res
    assert res["run"]["command"] == ["python", "x.py"] and res["run"]["bank"]["fingerprint"]
    # run is plan -> score -> summarise: the steps by hand give the same numbers
    bank = Bank.open(labelled_bank)
    options = incontext.InContextOptions(bootstrap=50, max_figures=2)
    planned = incontext.plan(bank, [load_network("random", "tiny", seed=3)], options)
    assert {j.query.scan_id for j in planned.jobs.jobs} == {"ct-02", "ct-03"}
    scored = incontext.score(planned, options)
    again = incontext.summarise(planned, scored, options)
    assert again["mean_dice"] == pytest.approx(res["mean_dice"])
    assert again["structures"] == res["structures"] and "run" not in again


def test_incontext_markdown_text_json_and_figures(incontext_result, tmp_path):
    res = incontext_result
    md = res.markdown()
    lines = md.splitlines()
    assert lines[0].startswith("Pretraining overlap: none") and "# In-context few-shot" in md
    assert "| network | shots | Dice [95% CI]" in md and "## Per case" in md
    assert "Command: `python x.py`" in md
    assert res.text().startswith("Headline (1 shot(s), random): mean Dice")
    parsed = json.loads(res.json())
    assert parsed["mean_dice"] == pytest.approx(res["mean_dice"])
    assert len(parsed["structures"]) == len(res["structures"])
    paths = res.figures(tmp_path / "figs")
    # two classes (max_figures), one network: one overlay each, drawn from kept 2-D panels
    assert len(paths) == 2 and all(p.read_bytes()[:4] == PNG for p in paths)
    assert res["figures"] == [str(p) for p in paths]
    assert all(p.name.startswith("incontext_random_phantom-ct_") for p in paths)
    out = res.write(tmp_path / "out")
    saved = json.loads((out / "results.json").read_text())
    assert saved["mean_dice"] == pytest.approx(res["mean_dice"])
    md = (out / "results.md").read_text(encoding="utf-8")
    assert md.count("](figures/incontext_") == 2
    assert len(list((out / "figures").glob("*.png"))) == 2


def test_result_json_is_strict(tmp_path):
    res = FinetuneResult({"x": math.nan, "y": [1.0, math.inf], "z": (1, 2)})
    assert json.loads(res.json()) == {"x": None, "y": [1.0, None], "z": [1, 2]}
    assert dict(res) == res.data and len(res) == 3


def _fake_finetune() -> FinetuneResult:
    """A fine-tuning result of two networks, two fractions and two split seeds, by hand."""
    runs = []
    for seed in (0, 1):
        for fraction in (0.5, 1.0):
            for name, base in (("pretrained", 0.6), ("scratch", 0.4)):
                dice = base + fraction / 10 + seed / 100
                test = {f"mean_{m}": dice for m in ("dice", "hd95", "asd", "nsd")}
                test["datasets"] = {"phantom-ct": {"dice": dice}}
                test["classes"] = {"phantom-ct/liver": {"dice": dice, "scans": 1}}
                runs.append(
                    {
                        "network": name,
                        "split_seed": seed,
                        "fraction": fraction,
                        "train_scans": ["a", "b"][: int(fraction * 2)],
                        "lr": 1e-3,
                        "lr_search": [{"lr": 1e-3, "val_dice": dice}],
                        "best_step": 2,
                        "val_dice": dice,
                        "untrained_classes": [],
                        "test": test,
                        "seconds": 1.5,
                    }
                )
    options = finetune.FinetuneOptions(fractions=(0.5, 1.0), split_seeds=(0, 1), lr_grid=(1e-3,))
    split = {"seed": 0, "by": "subject", "validation": ["v"], "test": ["t"], "fractions": {}}
    return FinetuneResult(
        {
            "headline": "mean over datasets",
            "split_seeds": [0, 1],
            "splits": [split],
            "options": {"steps": 4, "batch_size": 2, "val_every": 2},
            "optim": options.recipe(),
            "crop": 32,
            "summary": finetune.across_seeds(runs),
            "runs": runs,
        }
    )


def test_finetune_tables_and_figure(tmp_path):
    res = _fake_finetune()
    text = res.text()
    assert "mean ± sd over 2 split seeds" in text
    assert "0.655 ± 0.007" in text  # pretrained at fraction 0.5: 0.65 and 0.66
    md = res.markdown()
    assert md.startswith("# Label-efficient fine-tuning") and f"]({FIGURE})" in md
    assert "## Learning-rate search" in md and "| lr 0.001 |" in md
    assert "Provenance" not in md  # no run record: nothing to report
    (path,) = res.figures(tmp_path)
    assert path == tmp_path / FIGURE and path.read_bytes()[:4] == PNG


def test_finetune_names_the_networks_and_refuses_a_clash(labelled_bank):
    pre, scratch = load_network("random", "tiny"), load_network("scratch", "tiny")
    assert finetune.network_name(scratch) == "scratch"
    with pytest.raises(EvaluationError, match="distinct names"):
        finetune.plan(Bank.open(labelled_bank), [pre, scratch], finetune.FinetuneOptions())
    planned = finetune.plan(
        Bank.open(labelled_bank), [("a", pre), ("b", scratch)], finetune.FinetuneOptions()
    )
    assert [n for n, _ in planned.networks] == ["a", "b"] and planned.crop == pre.crop


def test_probe_run_result(labelled_bank, tmp_path):
    nets = load_with_baseline("random", "random", "tiny")
    options = probe.ProbeOptions("lesion", folds=2, settings=probe.ProbeSettings(epochs=2))
    res = probe.run(Bank.open(labelled_bank), nets, options)
    assert isinstance(res, probe.ProbeResult) and res.warnings == []
    assert res["folds_used"] == 2 and [n["network"] for n in res["networks"]] == ["random"]
    assert "| random |" in res.markdown() and "AUROC" in res.text()
    out = res.write(tmp_path)
    assert (out / probe.PLOT).read_bytes()[:4] == PNG
    assert json.loads((out / "results.json").read_text())["target"] == "lesion"
    with pytest.raises(EvaluationError, match="--folds 1: give at least 2"):
        probe.ProbeOptions("lesion", folds=1)
