"""In-context evaluation: reference choice, the protocol end to end, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bank import Bank
from flows.cli import main as cli
from train.evaluation.checkpoint import load_network
from train.evaluation.errors import EvaluationError
from train.evaluation.incontext import InContextOptions, ReferencePlan, evaluate_incontext
from train.evaluation.structures import StructureClass, centred_crop, median_foreground

LIVER = StructureClass("ds", 3, "liver", ("a", "b", "c", "d"))


def test_fixed_references_are_the_first_k_other_scans():
    plan = ReferencePlan(InContextOptions(shots=(2,)))
    assert plan.choose(LIVER, "a", 2, 0) == ["b", "c"]
    assert plan.choose(LIVER, "c", 2, 0) == ["a", "b"]
    assert plan.repeats == 1
    reason = plan.choose(LIVER, "a", 4, 0)
    assert isinstance(reason, str) and "3 other scan(s)" in reason and "need 4" in reason


def test_random_references_are_seeded_and_exclude_the_query():
    plan = ReferencePlan(InContextOptions(references="random", repeats=4, seed=7))
    draws = [tuple(plan.choose(LIVER, "a", 2, r)) for r in range(4)]
    assert all("a" not in d and len(set(d)) == 2 for d in draws)
    again = ReferencePlan(InContextOptions(references="random", repeats=4, seed=7))
    assert draws == [tuple(again.choose(LIVER, "a", 2, r)) for r in range(4)]
    assert len(set(draws)) > 1  # repeats draw differently (3 choose 2 = 3 options)


def test_references_named_in_a_file(tmp_path):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"ds": {"liver": ["d", "c"]}}))
    plan = ReferencePlan(InContextOptions(references=str(path)))
    assert plan.choose(LIVER, "a", 2, 0) == ["d", "c"]
    assert plan.choose(LIVER, "d", 1, 0) == ["c"]  # never the query itself
    assert "named in the references file" in plan.choose(LIVER, "d", 2, 0)


def test_centred_crop_pads_outside_the_volume():
    vol = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    crop = centred_crop(vol, (0, 1, 2), 4, -1.0)
    assert crop.shape == (4, 4, 4)
    assert crop[2, 2, 2] == vol[0, 1, 2]  # the centre lands at size // 2
    assert crop[0, 0, 0] == -1.0
    mask = np.zeros((9, 9, 9), bool)
    mask[2:5, 6, 1:8] = True
    assert median_foreground(mask) == (3, 6, 4)


def test_protocol_on_a_labelled_bank(labelled_bank, tiny_checkpoint, tmp_path):
    """Every class of the phantoms is scored in every query holding it, for both networks."""
    bank = Bank.open(labelled_bank)
    nets = [load_network(str(tiny_checkpoint)), load_network("random", "tiny")]
    assert nets[0].weights == "ema" and nets[0].sha256 and nets[1].weights == "random"
    res = evaluate_incontext(
        bank, nets, InContextOptions(shots=(1, 2)), progress=False, figures_dir=tmp_path
    )
    rows = res["structures"]
    assert {r["network"] for r in rows} == {nets[0].label, "random"}
    for r in rows:
        assert r["query"] not in r["references"] and len(r["references"]) == r["shots"]
        assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["nsd"] <= 1.0 and r["hd95"] >= 0.0
    one_shot = [r for r in rows if r["shots"] == 1 and r["network"] == "random"]
    # 4 CT phantoms: 8 organs in each, the lesion in 2 of them (1 reference each).
    assert len(one_shot) == 4 * 8 + 2
    reasons = [n["reason"] for n in res["not_scored"]]
    assert any("class absent" in r for r in reasons)
    assert any("2 shot(s) need 2" in r for r in reasons)  # the lesion has 1 other holder
    assert res["mean_dice"] == pytest.approx(
        np.mean([r["dice"] for r in rows if r["shots"] == 1 and r["network"] == nets[0].label])
    )
    assert len(res["figures"]) == 2 * 9 and all(p.endswith(".png") for p in res["figures"])


def test_untrained_floor_is_seeded():
    a, b = load_network("random", "tiny", seed=3), load_network("random", "tiny", seed=3)
    pairs = zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True)
    for (k, va), vb in pairs:
        assert torch.equal(va, vb), k


def test_cli_writes_json_table_and_figures(labelled_bank, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "ic"
    argv = ["evaluate", "incontext", "--checkpoint", str(tiny_checkpoint.parent.parent)]
    argv += ["--bank", labelled_bank, "--out", str(out), "--no-progress", "--json"]
    assert cli(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "results.json").read_text())
    assert printed["mean_dice"] == pytest.approx(saved["mean_dice"])
    row = saved["structures"][0]
    assert {"dataset", "class", "query", "references", "dice", "hd95", "nsd"} <= set(row)
    assert saved["run"]["command"][:3] == ["maskbank", "evaluate", "incontext"]
    assert saved["run"]["bank"]["fingerprint"]
    assert saved["run"]["networks"][0]["sha256"] and saved["run"]["networks"][0]["config"]
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| network | shots | Dice" in md and "random" in md
    assert any((out / "figures").glob("incontext_*liver*.png"))


def _unlabelled_bank(path) -> str:
    bank = Bank.create(path)
    image = np.zeros((32, 32, 32), np.float32)
    attrs = {
        "dataset": "x",
        "modality": "ct",
        "spacing": [1.0, 1.0, 1.0],
        "affine": np.eye(4).tolist(),
        "source_path": "none",
        "source_sha256": "none",
        "fingerprint": "none",
    }
    bank.write_scan("plain", {"image": image, "body": image > -1}, attrs)
    return str(path)


def test_bad_inputs_exit_2_with_a_reason(labelled_bank, tiny_checkpoint, tmp_path, capsys):
    base = ["evaluate", "incontext", "--no-progress"]

    def err(*argv: str) -> str:
        assert cli([*base, *argv]) == 2
        return capsys.readouterr().err

    plain = _unlabelled_bank(tmp_path / "plain")
    assert "no scan with a label map" in err("--checkpoint", "random", "--bank", plain)
    assert "does not exist" in err("--checkpoint", str(tmp_path / "no.pt"), "--bank", labelled_bank)
    msg = err("--checkpoint", str(tiny_checkpoint), "--preset", "small", "--bank", labelled_bank)
    assert "'tiny' network but --preset small" in msg
    assert "need 9" in err("--checkpoint", "random", "--bank", labelled_bank, "--shots", "9")


class _Planted:
    def __reduce__(self):
        return (print, ("code ran from a checkpoint",))


def test_a_planted_pickle_is_refused(labelled_bank, tmp_path, capsys):
    path = tmp_path / "planted.pt"
    torch.save({"model": _Planted(), "config": {}}, path)
    with pytest.raises(EvaluationError, match="weights_only=True"):
        load_network(str(path))
    assert "code ran" not in capsys.readouterr().out
