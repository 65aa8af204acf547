"""In-context evaluation: the split, the protocol end to end, the refusals and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskbank.bank import Bank
from maskbank.flows.cli import main as cli
from maskbank.train.evaluation import aggregate, incontext
from maskbank.train.evaluation.checkpoint import load_network
from maskbank.train.evaluation.errors import EvaluationError
from maskbank.train.evaluation.incontext import InContextOptions, ReferencePlan, pretraining_overlap
from maskbank.train.evaluation.structures import (
    StructureClass,
    centred_crop,
    find_classes,
    labelled_scans,
    median_foreground,
)
from tests.train.evaluation.conftest import write_labelled_phantoms

LIVER = StructureClass("ds", 3, "liver", ("a", "b", "c", "d"))
LESION = 9  # the phantoms' lesion label (in seeds 1 and 3 of the labelled bank)


def test_fixed_references_are_the_first_k_holders_whatever_the_query():
    plan = ReferencePlan(InContextOptions(shots=(1, 2)))
    assert plan.choose(LIVER, 2) == ["a", "b"]
    assert plan.choose(LIVER, 1) == ["a"]  # a prefix of the largest k's references
    assert plan.repeats == 1
    reason = ReferencePlan(InContextOptions(shots=(5,))).choose(LIVER, 5)
    assert isinstance(reason, str) and "4 scan(s)" in reason and "need 5 references" in reason
    assert ReferencePlan(InContextOptions(shots=(1, 4))).pool(LIVER) == ["a"]  # 4 leaves no query


def test_random_references_are_seeded_per_repeat_and_shared_by_classes():
    opts = InContextOptions(shots=(2,), references="random", repeats=4, seed=7)
    plan = ReferencePlan(opts)
    draws = [tuple(plan.choose(LIVER, 2, r)) for r in range(4)]
    assert draws == [tuple(ReferencePlan(opts).choose(LIVER, 2, r)) for r in range(4)]
    assert len(set(draws)) > 1  # repeats draw differently
    spleen = StructureClass("ds", 4, "spleen", LIVER.scans)
    assert [plan.choose(spleen, 2, r) for r in range(4)] == [list(d) for d in draws]


def test_split_never_scores_a_reference(labelled_bank):
    scans = labelled_scans(Bank.open(labelled_bank))
    classes, _ = find_classes(scans)
    split = ReferencePlan(InContextOptions(shots=(1,))).split("phantom-ct", classes, scans)
    # organs: first holder ct-00; the lesion (seeds 1, 3): ct-01
    assert split.references[3] == ["ct-00"] and split.references[LESION] == ["ct-01"]
    assert split.queries == ["ct-02", "ct-03"]
    assert set(split.queries).isdisjoint(set().union(*split.references.values()))
    assert split.excluded == {"ct-00": "reference", "ct-01": "reference"}


def test_references_named_in_a_file_are_never_queries(labelled_bank, tmp_path):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"phantom-ct": {"liver": ["ct-03"], "3": ["ct-03"]}}))
    scans = labelled_scans(Bank.open(labelled_bank))
    classes, _ = find_classes(scans)
    plan = ReferencePlan(InContextOptions(references=str(path)))
    liver = next(c for c in classes if c.name == "liver")
    spleen = next(c for c in classes if c.name == "spleen")
    assert plan.choose(liver, 1) == ["ct-03"]
    assert "named in the references file" in plan.choose(spleen, 1)
    split = plan.split("phantom-ct", classes, scans)
    assert "ct-03" not in split.queries and split.queries == ["ct-00", "ct-01", "ct-02"]


def test_a_subject_is_never_split_between_references_and_queries(tmp_path):
    def subjects(seed: int, arrays: dict, attrs: dict) -> None:
        attrs["metadata"]["subject"] = "s0" if seed in (0, 2) else f"s{seed}"

    bank = Bank.open(write_labelled_phantoms(tmp_path / "b", edit=subjects))
    scans = labelled_scans(bank)
    assert [s.subject for s in scans] == ["s0", "s1", "s0", "s3"]
    classes, _ = find_classes(scans)
    split = ReferencePlan(InContextOptions()).split("phantom-ct", classes, scans)
    assert split.queries == ["ct-03"]
    assert split.excluded["ct-02"] == "same subject as reference ct-00"


def test_centred_crop_pads_outside_the_volume():
    vol = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    crop = centred_crop(vol, (0, 1, 2), 4, -1.0)
    assert crop.shape == (4, 4, 4)
    assert crop[2, 2, 2] == vol[0, 1, 2]  # the centre lands at size // 2
    assert crop[0, 0, 0] == -1.0
    mask = np.zeros((9, 9, 9), bool)
    mask[2:5, 6, 1:8] = True
    assert median_foreground(mask) == (3, 6, 4)


def test_crop_centre_of_a_u_shape_lies_on_the_structure():
    mask = np.zeros((20, 20, 5), bool)
    mask[2:18, 2:5, :] = True  # the bottom of the U
    mask[2:5, 2:18, :] = True  # its arms
    mask[15:18, 2:18, :] = True
    assert not mask[10, 10, 2]  # the per-axis median lies in the hole
    centre = median_foreground(mask)
    assert mask[centre]
    assert centre[2] == 2 and abs(centre[0] - 10) + abs(centre[1] - 10) <= 8


def _hand_headline(rows: list[dict]) -> float:
    """Per class over queries, per dataset over classes, over datasets: the long way."""
    datasets = {}
    for d in {r["dataset"] for r in rows}:
        classes = {r["class"] for r in rows if r["dataset"] == d}
        datasets[d] = np.mean(
            [
                np.mean([r["dice"] for r in rows if (r["dataset"], r["class"]) == (d, c)])
                for c in classes
            ]
        )
    return float(np.mean(list(datasets.values())))


def test_aggregation_averages_classes_then_datasets():
    rows = [
        # dataset A: class x in 3 queries (mean 0.5), class y in 1 query (0.9) -> 0.7
        *(
            {"dataset": "A", "class": "x", "query": q, "dice": v}
            for q, v in zip("pqr", (0.2, 0.5, 0.8), strict=True)
        ),
        {"dataset": "A", "class": "y", "query": "p", "dice": 0.9},
        # dataset B: one class, one query -> 0.1; an absent row does not count
        {"dataset": "B", "class": "z", "query": "s", "dice": 0.1},
        {"dataset": "B", "class": "z", "query": "t", "dice": None, "present": False},
    ]
    head = aggregate.headline(rows)
    assert head["datasets"] == pytest.approx({"A": 0.7, "B": 0.1})
    assert head["mean"] == pytest.approx(0.4) == pytest.approx(_hand_headline(rows[:5]))
    assert head["micro"] == pytest.approx((0.2 + 0.5 + 0.8 + 0.9 + 0.1) / 5)
    ci = aggregate.bootstrap_ci(rows, n=2000, seed=3)
    assert ci == aggregate.bootstrap_ci(rows, n=2000, seed=3)  # seeded
    # only class x varies: its resampled mean (0.2 ... 0.8) moves the headline by a
    # quarter of its shift from 0.5 (one of 2 classes, one of 2 datasets)
    assert 0.325 - 1e-9 <= ci[0] < 0.4 < ci[1] <= 0.475 + 1e-9
    assert aggregate.bootstrap_ci(rows[3:5]) == [pytest.approx(0.5)] * 2  # no spread


def test_paired_difference_and_wilcoxon():
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    base = [
        {"dataset": "A", "class": c, "query": f"q{i}", "shots": 1, "dice": float(v)}
        for c in "xy"
        for i, v in enumerate(rng.uniform(0.2, 0.6, 12))
    ]
    better = [{**r, "dice": r["dice"] + 0.1 + 0.02 * (i % 3)} for i, r in enumerate(base)]
    res = aggregate.paired(better, base, n=500)
    diffs = np.array([b["dice"] - a["dice"] for a, b in zip(base, better, strict=True)])
    assert res["diff"] == pytest.approx(diffs.mean()) and res["pairs"] == 24
    assert res["ci"][0] > 0.09 and res["ci"][1] < 0.15
    assert res["p"] == pytest.approx(wilcoxon(diffs).pvalue) and res["p"] < 1e-3
    assert aggregate.paired(base, base)["p"] == 1.0


def _predictions(bank_path: str, net) -> tuple[dict, dict]:
    """Every probability map of one evaluation, keyed by (query, class value)."""
    maps = {}

    def keep(label, job, cls, prob):
        maps[(job.query.scan_id, cls.value)] = prob.copy()

    res = incontext.run(Bank.open(bank_path), [net], InContextOptions(), on_prediction=keep)
    return maps, res


def test_the_query_labels_never_steer_a_prediction(tmp_path):
    """Adding a structure to a query's label map leaves every other prediction bit-identical."""

    def add_lesion(seed: int, arrays: dict, attrs: dict) -> None:
        if seed == 2:  # ct-02, a query without lesions, gets one
            label = arrays["label"].copy()
            label[20:24, 20:24, 18:22] = LESION
            arrays["label"] = label
            attrs["label_names"][str(LESION)] = "lesion"

    plain = write_labelled_phantoms(tmp_path / "plain")
    edited = write_labelled_phantoms(tmp_path / "edited", edit=add_lesion)
    net = load_network("random", "tiny", seed=5)
    before, res_before = _predictions(plain, net)
    after, res_after = _predictions(edited, net)
    assert before.keys() == after.keys()
    assert ("ct-02", LESION) in before  # every class runs on every query, absent or not
    for key in before:
        if key != ("ct-02", LESION):
            assert np.array_equal(before[key], after[key]), key
    assert np.array_equal(before[("ct-02", LESION)], after[("ct-02", LESION)])
    row = next(r for r in res_before["structures"] if (r["query"], r["value"]) == ("ct-02", LESION))
    assert row["present"] is False and row["dice"] is None
    assert row["fp_voxels"] == row["pred_voxels"] and row["fp_ml"] == pytest.approx(
        row["pred_voxels"] * 8 / 1000
    )
    assert row["false_positive"] == (row["fp_largest_component"] >= 10)
    assert res_before["references"] == res_after["references"]
    # the thresholds come from the references alone: a query's label cannot move them
    assert res_before["thresholds"] == res_after["thresholds"] != []


def test_reference_thresholds_are_applied_and_recorded(labelled_bank):
    """Every row is its probability map at the threshold its class was calibrated to; the
    fixed rule is >= 0.5 and records no thresholds."""
    from maskbank.train.evaluation.calibration import LADDER

    net = load_network("random", "tiny", seed=2)
    bank = Bank.open(labelled_bank)
    maps = {}

    def keep(label, job, cls, prob):
        maps[(job.query.scan_id, cls.key)] = prob.copy()

    res = incontext.run(bank, [net], InContextOptions(bootstrap=20), on_prediction=keep)
    chosen = {t["class"]: t["threshold"] for t in res["thresholds"]}
    assert len(res["thresholds"]) == 9 and set(chosen.values()) <= set(LADDER)
    for r in res["structures"]:
        prob = maps[(r["query"], f"{r['dataset']}/{r['class']}")]
        assert r["pred_voxels"] == int((prob >= chosen[f"{r['dataset']}/{r['class']}"]).sum())
    assert res["options"]["threshold"].startswith("reference: volume on the augmented")
    first, second = (q for q in res["queries"])
    assert first["calibration_seconds"] > 0 and second["calibration_seconds"] == 0.0
    assert res["summary"][0]["classes_volume_in_range"] == sum(
        0.5 <= c["volume_ratio"] <= 2 for c in res["summary"][0]["classes"]
    )
    fixed = incontext.run(bank, [net], InContextOptions(bootstrap=20, threshold="fixed"))
    assert fixed["options"]["threshold"] == ">= 0.5" and fixed["thresholds"] == []
    for r in fixed["structures"]:
        prob = maps[(r["query"], f"{r['dataset']}/{r['class']}")]
        assert r["pred_voxels"] == int((prob >= 0.5).sum())
    with pytest.raises(EvaluationError, match="--threshold must be one of fixed, reference"):
        InContextOptions(threshold="auto")
    with pytest.raises(EvaluationError, match="--threshold-by"):
        InContextOptions(threshold_by="area")


def test_protocol_on_a_labelled_bank(labelled_bank, tiny_checkpoint, tmp_path):
    """Every class in every query, for both networks; the published means; paired test."""
    bank = Bank.open(labelled_bank)
    nets = [load_network(str(tiny_checkpoint)), load_network("random", "tiny")]
    assert nets[0].weights == "ema" and nets[0].sha256 and nets[1].weights == "random"
    res = incontext.run(bank, nets, InContextOptions(bootstrap=200, max_figures=2))
    res.figures(tmp_path)
    rows = res["structures"]
    assert {r["network"] for r in rows} == {nets[0].label, "random"}
    refs = {"ct-00", "ct-01"}
    for r in rows:
        assert r["query"] not in refs and r["query"] not in r["references"]
        if r["present"]:
            assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["nsd"] <= 1.0
            assert 0.0 <= r["hd95"] <= 500 and 0.0 <= r["asd"] <= 500
    first = [r for r in rows if r["network"] == nets[0].label]
    # 2 queries x 9 classes (8 organs + the lesion, absent from ct-02)
    assert len(first) == 2 * 9 and sum(not r["present"] for r in first) == 1
    assert res["mean_dice"] == pytest.approx(_hand_headline([r for r in first if r["present"]]))
    lo, hi = res["mean_dice_ci"]
    assert lo <= res["mean_dice"] <= hi
    assert res["datasets"][0]["dataset"] == "phantom-ct" and res["datasets"][0]["classes"] == 9
    assert [n["name"] for n in res["networks"]] == [nets[0].label, "random"]
    paired = res["networks"][1]["paired"]
    assert paired["pairs"] == 17 and 0 <= paired["p"] <= 1
    assert paired["diff"] == pytest.approx(res["networks"][1]["mean_dice"] - res["mean_dice"])
    assert res["misses"] == sum(r["miss"] for r in first if r["present"])
    assert res["pretraining_overlap"] == []  # the checkpoint pretrained on another bank
    assert res["pretraining_overlap_by_network"] == {nets[0].label: []}
    assert res["references"][0]["queries"] == ["ct-02", "ct-03"]
    assert len(res["figures"]) == 2 * 2 and all(p.endswith(".png") for p in res["figures"])


def test_shot_counts_cover_the_same_classes(labelled_bank, tmp_path):
    """A class scorable at 1 shot but not 2 is left out of both means and listed."""
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"phantom-ct": {"liver": ["ct-00"], "spleen": ["ct-00", "ct-01"]}}))
    net = load_network("random", "tiny", seed=1)
    opts = InContextOptions(shots=(1, 2), references=str(path), bootstrap=50)
    res = incontext.run(Bank.open(labelled_bank), [net], opts)
    by_k = {s["shots"]: s for s in res["summary"]}
    assert [c["class"] for c in by_k[1]["classes"]] == ["spleen"]
    assert [c["class"] for c in by_k[2]["classes"]] == ["spleen"]
    assert by_k[1]["dropped"] == ["phantom-ct/liver"] and by_k[2]["dropped"] == []
    assert {r["class"] for r in res["structures"] if r["shots"] == 1} == {"liver", "spleen"}
    with pytest.raises(EvaluationError, match=r"no structure class can be scored with \[3\]"):
        incontext.run(
            Bank.open(labelled_bank), [net], InContextOptions(shots=(1, 3), references=str(path))
        )


def test_label_names_that_disagree_are_an_error_unless_settled(tmp_path):
    def rename(seed: int, arrays: dict, attrs: dict) -> None:
        if seed == 1:
            attrs["label_names"]["3"] = "hepar"  # the liver's value, named otherwise
        if seed == 2:
            attrs["label_names"]["2"] = "lung_right"  # two values, one name

    scans = labelled_scans(Bank.open(write_labelled_phantoms(tmp_path / "b", edit=rename)))
    with pytest.raises(EvaluationError) as err:
        find_classes(scans)
    msg = str(err.value)
    assert "value 3 is named 'hepar' in scans ct-01; 'liver' in scans ct-00, ct-02, ct-03" in msg
    assert "names 2 values 'lung_right'" in msg and "value 1" in msg and "value 2" in msg
    assert "--label-names" in msg
    classes, _ = find_classes(scans, label_names={1: "right lung", 2: "left lung", 3: "liver"})
    names = {c.value: c.name for c in classes}
    assert names[1] == "right lung" and names[3] == "liver" and names[4] == "4"


def test_overlap_with_the_pretraining_bank(phantom_bank, tiny_checkpoint):
    net = load_network(str(tiny_checkpoint))
    record = net.pretraining_scans
    pretrained = Bank.open(phantom_bank)
    assert record == [
        {"scan_id": r["scan_id"], "source_sha256": r["source_sha256"]} for r in pretrained.index
    ]
    overlap, detail = pretraining_overlap(
        [net, load_network("random", "tiny")], labelled_scans(pretrained)
    )
    assert overlap == sorted(r["scan_id"] for r in pretrained.index) == detail[net.label]


def test_untrained_floor_is_seeded():
    a, b = load_network("random", "tiny", seed=3), load_network("random", "tiny", seed=3)
    pairs = zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True)
    for (k, va), vb in pairs:
        assert torch.equal(va, vb), k


@pytest.fixture(scope="session")
def overlapping_bank(phantom_bank, tmp_path_factory) -> str:
    """The labelled bank, but query ct-03's source is a scan the tiny checkpoint saw."""
    seen = Bank.open(phantom_bank).index[0]["source_sha256"]

    def same_source(seed: int, arrays: dict, attrs: dict) -> None:
        if seed == 3:
            attrs["source_sha256"] = seen

    return write_labelled_phantoms(tmp_path_factory.mktemp("eval") / "ov", edit=same_source)


def test_cli_writes_json_table_and_warns_of_overlap(
    overlapping_bank, tiny_checkpoint, tmp_path, capsys
):
    out = tmp_path / "ic"
    argv = ["evaluate", "incontext", "--checkpoint", str(tiny_checkpoint.parent.parent)]
    argv += ["--bank", overlapping_bank, "--out", str(out), "--no-progress", "--json"]
    assert cli([*argv, "--bootstrap", "100", "--tolerance-mm", "3"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    saved = json.loads((out / "results.json").read_text())
    assert printed["mean_dice"] == pytest.approx(saved["mean_dice"])
    for key in ("mean_dice_ci", "datasets", "structures", "networks", "misses", "references"):
        assert key in saved, key
    row = saved["structures"][0]
    keys = {"network", "dataset", "class", "query", "references", "present", "dice", "hd95"}
    assert keys | {"asd", "nsd", "pred_voxels", "gt_voxels"} <= set(row)
    assert saved["options"]["tolerance_mm"] == 3.0
    assert saved["pretraining_overlap"] == ["ct-03"]
    assert "WARNING: 1 query scan(s) were in the pretraining data" in captured.err
    assert "ct-03" in captured.err
    md = (out / "results.md").read_text(encoding="utf-8")
    assert md.splitlines()[0].startswith("WARNING: 1 query scan(s)")
    assert "| network | shots | Dice [95% CI]" in md and "## Per case" in md
    assert "## Paired differences vs" in md and "random" in md
    assert saved["run"]["command"][:3] == ["maskbank", "evaluate", "incontext"]
    assert saved["run"]["bank"]["fingerprint"]
    assert saved["run"]["networks"][0]["sha256"] and saved["run"]["networks"][0]["config"]
    assert any((out / "figures").glob("incontext_*liver*.png"))


def test_a_reconstruction_checkpoint_is_refused_in_context(
    labelled_bank, tiny_checkpoint, tmp_path, capsys
):
    from maskbank.train.checkpointing import load_checkpoint, save_checkpoint

    payload = load_checkpoint(tiny_checkpoint)
    payload["config"]["pretext"] = "reconstruction"
    path = save_checkpoint(tmp_path / "recon", int(payload["step"]), payload)
    argv = ["evaluate", "incontext", "--checkpoint", str(path), "--bank", labelled_bank]
    assert cli([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pretext 'reconstruction'" in err and "evaluate finetune" in err and "probe" in err


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
    msg = err("--checkpoint", "random", "--bank", labelled_bank, "--shots", "1,9")
    assert "scored with [9] shot(s)" in msg
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "lung", "2": "lung"}))
    msg = err("--checkpoint", "random", "--bank", labelled_bank, "--label-names", str(names))
    assert "names 2 values 'lung'" in msg


class _Planted:
    def __reduce__(self):
        return (print, ("code ran from a checkpoint",))


def test_a_planted_pickle_is_refused(labelled_bank, tmp_path, capsys):
    path = tmp_path / "planted.pt"
    torch.save({"model": _Planted(), "config": {}}, path)
    with pytest.raises(EvaluationError, match="weights_only=True"):
        load_network(str(path))
    assert "code ran" not in capsys.readouterr().out


def test_registration_baseline_runs_in_the_same_loop(labelled_bank, tmp_path, capsys):
    """`--checkpoint registration`: atlas segmentation scored like a network, timed per query."""
    out = tmp_path / "reg"
    argv = ["evaluate", "incontext", "--checkpoint", "registration", "--no-baseline"]
    argv += ["--bank", labelled_bank, "--out", str(out), "--no-progress", "--json"]
    assert cli([*argv, "--bootstrap", "100"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in res["networks"]] == ["registration"]
    assert {r["network"] for r in res["structures"]} == {"registration"}
    assert res["networks"][0]["seconds_per_query"] > 0
    # 2 queries x 2 references, and the calibration: the 2 reference scans' copies
    # segmented as queries are, with both references
    assert res["baselines"]["registration"]["registrations"] == 8
    assert res["pretraining_overlap"] == [] and res["pretraining_overlap_by_network"] == {}
    assert res["mean_dice"] > 0.3  # the phantoms differ little: registration finds the organs
    assert res["run"]["networks"][0]["label"] == "registration"
