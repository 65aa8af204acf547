"""`maskbank proposals-quality` options on a small real bank: baseline, levels, sizes, sorting."""

import csv
import json

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.writing import write_proposals
from maskbank.flows.cli import main
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.normalize import invert_normalization
from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.prepare import prepare_scan
from maskbank.pipeline.proposals.engine import generate_proposals


@pytest.fixture(scope="module")
def phantom_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    bank = Bank.create(root / "bank")
    ph = make_phantom("ct", shape=(64, 64, 48), spacing=(1.5, 1.5, 1.5), seed=0)
    img, lab = ph.save_nifti(root / "raw", name="ct0")
    names = root / "names.json"
    names.write_text(json.dumps({str(k): v for k, v in ph.names.items()}), encoding="utf-8")
    prep = prepare_scan(img, lab, config=PrepareConfig(modality="ct"), label_names=names)
    bank.write_scan("ct0", prep.arrays(), prep.attrs)
    raw = invert_normalization(prep.image.astype(np.float32), prep.attrs["normalization"])
    write_proposals(bank, "ct0", generate_proposals(raw, prep.body, prep.spacing, "ct"))
    return root / "bank"


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(["proposals-quality", *map(str, argv)])
    return rc, capsys.readouterr().out


def test_baseline_levels_and_csv(phantom_bank, tmp_path, capsys):
    out_csv = tmp_path / "rows.csv"
    rc, out = _run(
        capsys, phantom_bank, "--baseline", "slic:300", "--levels", "0.5,0.8,0.9",
        "--csv", out_csv, "--json",
    )  # fmt: skip
    assert rc == 0
    q = json.loads(out)
    assert {"abo", "recall_50", "recall_70", "recall_80", "recall_90"} <= set(q)
    assert q["baseline"]["method"] == "slic:300"
    scan = q["scans"][0]
    assert scan["baseline"]["proposals"] > 50
    # every structure is scored by both, on the same grid
    assert set(scan["baseline"]["structures"]) == set(scan["structures"])
    assert q["abo"] > q["baseline"]["abo"]
    with open(out_csv, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == q["structures"] > 3
    assert {"scan_id", "structure", "voxels", "best_dice", "baseline_dice"} <= set(rows[0])
    sizes = [int(r["voxels"]) for r in rows]
    assert sizes == sorted(sizes)  # default --sort size: smallest first


def test_min_voxels_and_sort(phantom_bank, capsys):
    rc, out = _run(capsys, phantom_bank, "--json")
    assert rc == 0
    everything = json.loads(out)
    cut = sorted(r["voxels"] for r in everything["rows"])[len(everything["rows"]) // 2]
    rc, out = _run(capsys, phantom_bank, "--json", "--min-voxels", cut, "--sort", "abo")
    q = json.loads(out)
    assert 0 < q["structures"] < everything["structures"]
    assert all(r["voxels"] >= cut for r in q["rows"])
    dice = [r["best_dice"] for r in q["rows"]]
    assert dice == sorted(dice)  # worst covered first
    rc, out = _run(capsys, phantom_bank, "--sort", "name")
    assert rc == 0 and "best Dice" in out and "overall" in out
    assert "ABO" in out.splitlines()[0] and "R@.90" in out.splitlines()[0]


@pytest.mark.parametrize(
    "argv", [["--baseline", "sam"], ["--levels", "1.5"], ["--min-voxels", "0"]]
)
def test_bad_options_exit_2(phantom_bank, capsys, argv):
    assert main(["proposals-quality", str(phantom_bank), *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_structure_table_shows_whole_scan_ids():
    from maskbank.flows.commands.proposals_quality import format_table

    ids = ["BraTS2021_00000-t1ce-a", "BraTS2021_00000-t1ce-b"]  # alike in their first 20
    scans = [{"scan_id": s, "abo": 0.8, "proposals": 9, "bytes_per_proposal": 10.0} for s in ids]
    rows = [
        {"scan_id": s, "structure": "tumour", "voxels": 100 + i, "best_dice": 0.5}
        for i, s in enumerate(ids)
    ]
    q = {"abo": 0.8, "proposals_per_scan": 9, "bytes_per_proposal": 10.0,
         "scans": scans, "rows": rows}  # fmt: skip
    lines = format_table(q).splitlines()
    table = lines[lines.index("") + 1 :]
    assert [line.split()[0] for line in table] == ["scan", *ids]
    assert len({line.index("tumour") for line in table[1:]}) == 1  # one column, aligned
    assert table[0].index("structure") == table[1].index("tumour")
    longer = {**q, "scans": [{**scans[0], "scan_id": "x" * 40}]}
    head, first = format_table(longer).splitlines()[:2]
    assert head.index("ABO") + 3 == first.index("0.800") + 5  # values under their title
