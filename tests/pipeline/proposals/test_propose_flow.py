"""`maskbank propose` / `proposals-quality` end to end: real NIfTI -> bank -> Prefect/Dask flow."""

import json

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.sampling import ProposalReader
from maskbank.flows.cli import main
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.prepare import prepare_scan


@pytest.fixture(scope="module")
def phantom_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("propose")
    bank = Bank.create(root / "bank")
    for seed, modality in ((0, "ct"), (1, "mr")):
        ph = make_phantom(modality, shape=(72, 72, 56), spacing=(1.5, 1.5, 1.5), seed=seed)
        img, lab = ph.save_nifti(root / "raw", name=f"{modality}{seed}")
        prep = prepare_scan(img, lab, config=PrepareConfig(modality=modality))
        bank.write_scan(f"{modality}{seed}", prep.arrays(), prep.attrs)
    return root / "bank"


@pytest.mark.slow
def test_propose_then_skip_then_quality(phantom_bank, prefect_api, capsys):
    assert main(["propose", str(phantom_bank), "--json", "--no-progress", "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"ok": 2, "skipped": 0, "failed": 0}
    bank = Bank.open(phantom_bank)
    for sid in bank.scan_ids:
        pr = ProposalReader(bank.scan(sid))
        assert pr.count > 100
        assert bank.scan(sid).proposals_attrs["fingerprint"] == report["fingerprint"]
        i = int(np.argmax(pr.table["voxels"]))
        assert pr.mask(i).sum() == pr.table["voxels"][i]

    # unchanged config -> every scan is skipped (cached), a changed option redoes them
    assert main(["propose", str(phantom_bank), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["skipped"] == 2
    assert (
        main(
            [
                "propose",
                str(phantom_bank),
                "--json",
                "--no-progress",
                "--scans",
                "ct0",
                "--max-proposals",
                "300",
            ]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["counts"]["ok"] == 1 and rep["scans"][0]["n_proposals"] <= 300

    # a byte budget below what the scan's set costs drops generated layers, and says so
    argv = ["propose", str(phantom_bank), "--json", "--no-progress", "--scans", "ct0"]
    assert main([*argv, "--max-bytes-per-proposal", "35"]) == 0
    row = json.loads(capsys.readouterr().out)["scans"][0]
    budget = Bank.open(phantom_bank).scan("ct0").proposals_attrs["byte_budget"]
    assert budget["dropped"] > 0 and budget["dropped_layers"]
    assert row["reason"].startswith("byte budget: dropped layer(s) ")
    assert row["bytes_per_proposal"] <= 35 or not budget["fits"]

    assert main(["proposals-quality", str(phantom_bank), "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert {"abo", "recall_50", "recall_70", "proposals_per_scan", "bytes_per_proposal"} <= set(q)
    # the small phantoms' lesions are below the 500 mm^3 minimum, hence recall < 1
    assert q["scans_scored"] == 2 and q["abo"] > 0.6 and q["recall_50"] >= 0.6
    assert 0 < q["bytes_per_proposal"] < 2000
    assert main(["proposals-quality", str(phantom_bank)]) == 0
    assert "overall" in capsys.readouterr().out


def test_clear_errors(tmp_path, capsys):
    assert main(["propose", str(tmp_path / "nope")]) == 2
    assert "not a maskbank bank" in capsys.readouterr().err
    bank = Bank.create(tmp_path / "b")
    ph = make_phantom("ct", shape=(32, 32, 24), seed=0)
    bank.write_scan("s", {"image": ph.image, "body": ph.body}, {"spacing": [1.5] * 3})
    assert main(["proposals-quality", str(tmp_path / "b")]) == 1
    assert "no scan has proposals" in capsys.readouterr().err
    assert main(["propose", str(tmp_path / "b"), "--scans", "zzz"]) == 2
    assert main(["propose", str(tmp_path / "b"), "--generators", "sam2"]) == 2
