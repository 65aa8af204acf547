"""`maskbank propose` plans before anything heavy: a run with no work reports without the
flow (no Prefect, no Dask, no proposal engine), and a run with work is planned once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maskbank.flows import planning
from maskbank.flows.cli import main
from tests.flows.cli_run import ENV, REPO
from tests.flows.scans import phantom_bank

OPTS = ["--generators", "supervoxels", "--scales", "40", "--max-proposals", "30", "--no-progress"]
HEAVY = ("prefect", "distributed", "torch", "torch_geometric", "maskbank.pipeline.proposals.engine")
# What differs between two runs of the same plan: when and where they ran.
RUN_KEYS = ("started_at", "seconds", "report_path")


def _comparable(report: dict) -> dict:
    report = json.loads(json.dumps(report))  # as printed and stored
    rows = [{k: v for k, v in r.items() if k not in ("seconds", "worker")} for r in report["scans"]]
    return {**{k: v for k, v in report.items() if k not in RUN_KEYS}, "scans": rows}


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
    assert _comparable(settled) == _comparable(flow_report)
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
    code = (
        "import sys; from maskbank.flows.cli import main; "
        f"rc = main(['propose', {str(bank)!r}, *{OPTS!r}, '--json']); "
        f"print(rc, [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert out.stderr.strip().splitlines()[-1] == "0 []", out.stderr
    assert json.loads(out.stdout)["counts"]["skipped"] == 2
