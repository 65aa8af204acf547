"""`maskbank prepare` plans before anything heavy: a run with every input done reports
without the flow (no Prefect, no Dask, no pipeline), and a run with work is planned once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskbank.flows import planning
from maskbank.flows.cli import main
from tests.flows.cli_run import comparable_report, run_and_list_modules
from tests.flows.scans import write_phantom

OPTS = ["--spacing", "3", "--workers", "1", "--no-progress"]
PROPOSALS = ["--proposals", "--generators", "supervoxels", "--scales", "40"]
HEAVY = (
    "prefect",
    "distributed",
    "dask",
    "torch",
    "torch_geometric",
    "maskbank.flows.prepare",
    "maskbank.flows.per_scan",
    "maskbank.pipeline.prepare",
    "maskbank.pipeline.proposals.engine",
)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prepare-cmd") / "in"
    for i, name in enumerate(("a", "b")):
        write_phantom(folder, name, seed=i)
    return folder


def _prepare(capsys, src: Path, bank: Path, *extra: str) -> dict:
    """``maskbank prepare SRC --bank BANK ... --json``: its report."""
    assert main(["prepare", str(src), "--bank", str(bank), *OPTS, *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "extra",
    [(), ("--id-from", "hash"), tuple(PROPOSALS)],
    ids=["names", "hashed-ids", "proposals"],
)
def test_work_is_planned_once_and_no_work_needs_no_flow(
    prefect_api: str,
    src: Path,
    tmp_path: Path,
    extra: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    from maskbank.flows import prepare

    bank = tmp_path / "bank"
    plans = []
    real = planning.plan_prepare
    monkeypatch.setattr(planning, "plan_prepare", lambda *a, **k: plans.append(1) or real(*a, **k))
    made = _prepare(capsys, src, bank, *extra)
    assert made["counts"] == {"ok": 2, "skipped": 0, "failed": 0}
    assert len(plans) == 1  # the flow took the command's plan over

    # Every input done: the report of the flow, without the flow.
    flow_report = prepare.prepare_bank(
        [str(src)],
        str(bank),
        made["config"],
        workers=made["workers"],
        proposals=made["proposals_config"],
        progress=False,
    )
    assert flow_report["counts"] == {"ok": 0, "skipped": 2, "failed": 0}
    monkeypatch.setattr(prepare, "prepare_bank", lambda **kw: pytest.fail("the flow ran"))
    settled = _prepare(capsys, src, bank, *extra)
    assert settled["counts"] == {"ok": 0, "skipped": 2, "failed": 0}
    assert comparable_report(settled) == comparable_report(flow_report)
    stored = json.loads(Path(settled["report_path"]).read_text())
    assert comparable_report({**stored, "label_name_conflicts": []}) == comparable_report(settled)
    if "hash" in extra:  # a shared report names no file or folder either
        assert "image" not in settled["scans"][0] and str(src) not in json.dumps(stored)
    if extra == tuple(PROPOSALS):
        assert {r["proposals"] for r in settled["scans"]} == {"skipped"}
        assert all(r["n_proposals"] > 0 for r in settled["scans"])
        # other proposal options: the scans are done, their proposals are work (the flow)
        monkeypatch.undo()
        redo = _prepare(capsys, src, bank, *PROPOSALS[:-1], "30")
        assert {r["proposals"] for r in redo["scans"]} == {"ok"}
        return
    # The table, as a flow run prints it.
    assert main(["prepare", str(src), "--bank", str(bank), *OPTS, *extra]) == 0
    table = capsys.readouterr().out
    assert "0 ok, 2 skipped, 0 failed in" in table and "report: " in table
    assert main(["prepare", str(src), "--bank", str(bank), *OPTS, *extra, "--dry-run"]) == 0
    assert "plan: 0 new, 0 changed, 2 done" in capsys.readouterr().out


def test_a_run_with_no_work_loads_no_prefect_dask_or_pipeline(
    prefect_api: str, src: Path, tmp_path: Path
) -> None:
    bank = tmp_path / "bank"
    args = ["prepare", str(src), "--bank", str(bank), *OPTS, "--json"]
    assert main(args) == 0
    stdout, stderr = run_and_list_modules(args, HEAVY)
    assert stderr.strip().splitlines()[-1] == "0 []", stderr
    assert json.loads(stdout)["counts"]["skipped"] == 2


def test_help_says_a_run_with_nothing_to_do_records_no_flow_run(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "no flow run is recorded" in " ".join(capsys.readouterr().out.split())
