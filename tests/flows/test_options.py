"""Options the `maskbank` commands share mean the same in each (flows/commands/options.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskbank.bank import Bank
from maskbank.flows.cli import build_parser, main
from maskbank.flows.commands.options import open_bank_scans
from maskbank.pipeline.phantom import make_phantom


@pytest.mark.parametrize(
    "argv",
    [
        ["prepare", "in/", "--bank", "b/"],
        ["propose", "b/"],
        ["demo", "--out", "o/"],
    ],
)
def test_workers_below_one_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert build_parser().parse_args([*argv, "--workers", "3"]).workers == 3
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([*argv, "--workers", "0"])
    assert stop.value.code == 2
    assert "--workers: must be >= 1" in capsys.readouterr().err


def test_cluster_options_of_prepare_and_propose() -> None:
    prepare = build_parser().parse_args(
        ["prepare", "x", "--bank", "b", "--dask-address", "tcp://h:1"]
    )
    assert (prepare.dask_address, prepare.processes) == ("tcp://h:1", False)
    propose = build_parser().parse_args(["propose", "b", "--scans", "a,b", "--no-progress"])
    assert (propose.dask_address, propose.scans, propose.no_progress) == (None, "a,b", True)


def test_open_bank_scans_refuses_unknown_scans_and_non_banks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bank = Bank.create(tmp_path / "b")
    ph = make_phantom("ct", shape=(24, 24, 16), seed=0)
    bank.write_scan("s", {"image": ph.image, "body": ph.body}, {"spacing": [1.5] * 3})
    store, ids = open_bank_scans("prog", str(tmp_path / "b"), " s ")
    assert ids == ["s"] and store.scan_ids == ["s"]
    assert open_bank_scans("prog", str(tmp_path / "b"))[1] is None  # all scans
    assert open_bank_scans("prog", str(tmp_path / "b"), "s,zzz") is None
    assert "prog: error: scans not in the bank: ['zzz']" in capsys.readouterr().err
    assert open_bank_scans("prog", str(tmp_path / "nope")) is None
    assert "prog: error:" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope")]) == 2  # info opens BANK the same way
