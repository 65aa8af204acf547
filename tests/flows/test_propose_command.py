"""`maskbank propose` plans before anything heavy: a run with no work reports without the
flow (no Prefect, no Dask, no proposal engine), and a run with work is planned once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskbank.flows import planning
from maskbank.flows.cli import main
from tests.flows.cli_run import comparable_report, run_and_list_modules
from tests.flows.scans import phantom_bank

OPTS = ["--generators", "supervoxels", "--scales", "40", "--max-proposals", "30", "--no-progress"]
HEAVY = ("prefect", "distributed", "torch", "torch_geometric", "maskbank.pipeline.proposals.engine")


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantom_bank(tmp_path_factory.mktemp("propose-cmd"), "in", "cmd", names=("a", "b"))


def test_work_is_planned_once_and_no_work_needs_no_flow(
    prefect_api: str, bank: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from maskbank.flows import propose

    plans = []
    real = planning.proposals_up_to_date
    monkeypatch.setattr(
        planning, "proposals_up_to_date", lambda *a, **k: plans.append(a[1]) or real(*a, **k)
    )
    assert main(["propose", str(bank), *OPTS, "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["counts"] == {"ok": 2, "skipped": 0, "failed": 0}
    assert len(plans) == 1  # the flow took the command's plan over

    # Everything done: the report of the flow, without the flow.
    flow_report = propose.propose_bank(str(bank), made["config"], progress=False)
    monkeypatch.setattr(propose, "propose_bank", lambda **kw: pytest.fail("the flow ran"))
    assert main(["propose", str(bank), *OPTS, "--json"]) == 0
    settled = json.loads(capsys.readouterr().out)
    assert settled["counts"] == {"ok": 0, "skipped": 2, "failed": 0}
    assert comparable_report(settled) == comparable_report(flow_report)
    assert Path(settled["report_path"]).exists()
    assert json.loads(Path(settled["report_path"]).read_text())["counts"] == settled["counts"]
    # The table, as a flow run prints it.
    assert main(["propose", str(bank), *OPTS]) == 0
    table = capsys.readouterr().out
    assert "0 ok, 2 skipped, 0 failed in" in table and "report: " in table

    assert main(["propose", str(bank), *OPTS, "--dry-run"]) == 0
    assert "plan: 0 scans need proposals set 'default', 2 are up to date" in capsys.readouterr().out
    assert main(["propose", str(bank), *OPTS, "--dry-run", "--json", "--force"]) == 0
    dry = json.loads(capsys.readouterr().out)["plan"]
    assert dry == {"counts": {"work": 2, "done": 0}, "work": ["a", "b"]}


def test_a_run_with_no_work_loads_no_prefect_dask_torch_or_engine(
    prefect_api: str, bank: Path
) -> None:
    main(["propose", str(bank), *OPTS, "--json"])  # done, whichever test ran first
    args = ["propose", str(bank), *OPTS, "--json"]
    stdout, stderr = run_and_list_modules(args, HEAVY)
    assert stderr.strip().splitlines()[-1] == "0 []", stderr
    assert json.loads(stdout)["counts"]["skipped"] == 2
