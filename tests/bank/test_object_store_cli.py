"""`maskbank prepare / propose / verify / info` on a bank on S3 (moto's server on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.sampling import ProposalReader
from maskbank.flows.commands.options import redacted_argv
from maskbank.pipeline.mask_import import on_bank_grid
from tests.conftest import REPO
from tests.flows.scans import write_phantom
from tests.s3_server import S3

SECRET = "testing-secret-value"  # the loopback server's fake secret, as a user would pass it


def _maskbank(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maskbank.flows.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=600,
    )


def test_argv_records_never_hold_credentials() -> None:
    options = json.dumps({"key": "AKIA-1", "client_kwargs": {"aws_secret_access_key": SECRET}})
    argv = ["verify", "s3://b/bank", "--storage-options", options]
    text = " ".join(redacted_argv(argv) + redacted_argv([f"--storage-options={options}"]))
    assert SECRET not in text and "AKIA-1" not in text and "<redacted>" in text
    assert redacted_argv(["info", "--storage-options", "{not json"])[-1] == "<redacted>"


def test_cli_prepares_proposes_verifies_and_summarises_a_bank_on_s3(
    prefect_api: str, s3: S3, tmp_path: Path
) -> None:
    for i, name in enumerate(("ct-a", "ct-b")):
        write_phantom(tmp_path / "in", name, seed=i)
    url = s3.url()
    with_secret = json.dumps({**s3.options, "key": "testing-key-id", "secret": SECRET})
    opts = ("--storage-options", with_secret)
    out = _maskbank(
        "prepare", str(tmp_path / "in"), "--bank", url, *opts, "--spacing", "3", "--no-progress"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 ok, 0 skipped, 0 failed" in out.stdout
    out = _maskbank("propose", url, *opts, "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    # options from the environment, as on a cluster's workers
    out = _maskbank("verify", url, env={"MASKBANK_STORAGE_OPTIONS": s3.options_json})
    assert out.returncode == 0 and "ok: 2 scans" in out.stdout, out.stdout + out.stderr
    out = _maskbank("verify", url, *opts, "--repair")  # writes: rewrites index.json
    assert out.returncode == 0 and "ok: 2 scans" in out.stdout, out.stdout + out.stderr
    out = _maskbank("info", url, *opts, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["scans"] == 2
    bad = _maskbank("info", url, "--storage-options", '{"secret": "' + SECRET + '"')
    assert bad.returncode == 2 and SECRET not in bad.stderr
    bank = Bank.open(url, storage_options=s3.options)
    assert all(bank.row(s)["n_proposals"] > 0 for s in bank.scan_ids)
    assert len(bank.reports()) == 2  # prepare and propose
    fs = s3.filesystem()
    for key in fs.find(s3.bucket):  # no object of the bank holds the secret
        assert SECRET.encode() not in fs.cat_file(key), key


@pytest.mark.slow  # ~25 s: prepare (~9 s) and the import flow (~15 s)
def test_cli_imports_label_maps_from_a_manifest_onto_a_bank_on_s3(
    prefect_api: str, s3: S3, tmp_path: Path
) -> None:
    """`maskbank propose s3://... --import manifest.csv --name labels`: each scan's label map
    (source grid, a local NIfTI) becomes a proposal set in the bank on S3, one proposal per
    label value, voxel for voxel the region `prepare` stored as the scan's label."""
    labels = {}
    for i, name in enumerate(("ct-a", "ct-b")):
        _, labels[name] = write_phantom(tmp_path / "in", name, seed=i)
    url = s3.url()
    opts = ("--storage-options", s3.options_json)
    out = _maskbank(
        "prepare", str(tmp_path / "in"), "--bank", url, *opts, "--spacing", "3", "--no-progress"
    )
    assert out.returncode == 0 and "2 ok" in out.stdout, out.stdout + out.stderr
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "scan_id,path\n" + "".join(f"{s},{p}\n" for s, p in labels.items()), encoding="utf-8"
    )
    out = _maskbank(
        "propose", url, *opts, "--import", str(manifest), "--name", "labels", "--json",
        "--no-progress",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["scan_id"]: r for r in json.loads(out.stdout)["scans"]}
    assert {s: r["status"] for s, r in rows.items()} == {"ct-a": "ok", "ct-b": "ok"}

    bank = Bank.open(url, storage_options=s3.options)
    for scan_id, label_file in labels.items():
        scan = bank.scan(scan_id)
        assert "labels" in scan.proposal_sets
        label = np.asarray(scan.read("label"))
        assert np.array_equal(label, on_bank_grid(label_file, scan.attrs))
        values = np.unique(label[label > 0])
        assert len(values) > 1
        reader = ProposalReader(scan, name="labels")
        assert reader.count == len(values) == rows[scan_id]["n_proposals"]
        found = set()
        for i in range(reader.count):
            mask = reader.mask(i)
            (value,) = np.unique(label[mask])  # one label region per proposal...
            assert np.array_equal(mask, label == value)  # ...all of it, nothing else
            found.add(int(value))
        assert found == {int(v) for v in values}
        assert Path(reader.attrs["imported_from"]) == label_file.absolute()
