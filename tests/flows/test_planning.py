"""Runs are planned before any task exists (new / changed / done by path, size and mtime)
and their work runs in batches, each scan with its own outcome."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.flows.per_scan import BATCHES_PER_WORKER, make_batches
from maskbank.pipeline.config import PrepareConfig
from tests.flows.scans import write_bad_inputs, write_phantom

CONFIG = PrepareConfig(spacing=(3.0, 3.0, 3.0)).to_dict()


def _statuses(report: dict) -> dict[str, str]:
    return {r["scan_id"]: r["status"] for r in report["scans"]}


def _plain_nifti(folder: Path, name: str, seed: int) -> Path:
    """An uncompressed phantom: another seed gives another content of exactly the same size."""
    from maskbank.pipeline.phantom import make_phantom

    ph = make_phantom("ct", shape=(48, 48, 40), spacing=(3.0, 3.0, 3.0), seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.nii"
    nib.save(nib.Nifti1Image(np.round(ph.image).astype(np.int16), ph.affine), path)
    return path


def _plan(inputs: list[str], bank: Path, rehash: bool = False):
    from maskbank.flows.inputs import collect_inputs
    from maskbank.flows.planning import plan_prepare

    scans = collect_inputs(inputs)
    rows = Bank.open(bank).index_rows
    fingerprint = PrepareConfig.from_dict(CONFIG).fingerprint()
    return plan_prepare(scans, rows, fingerprint, rehash=rehash)


def test_batches_by_cost_or_count() -> None:
    assert make_batches([], 2) == []
    assert make_batches([1.0] * 7, 2, batch=3) == [[0, 1, 2], [3, 4, 5], [6]]
    tiny = make_batches([0.03] * 10_000, 2)  # 10k small scans: a few dozen tasks
    assert [i for b in tiny for i in b] == list(range(10_000))
    assert 2 * BATCHES_PER_WORKER <= len(tiny) <= 100
    big = make_batches([30.0] * 10, 2)  # scans of tens of seconds: one a task
    assert big == [[i] for i in range(10)]
    some = make_batches([0.5] * 64, 2)  # enough batches for every worker
    assert len(some) == 2 * BATCHES_PER_WORKER
    few = make_batches([0.05] * 30, 2)  # a few small scans (a grown folder): one task
    assert few == [list(range(30))]


def test_plan_new_changed_done_and_rehash(prefect_api: str, tmp_path: Path) -> None:
    """A done scan is never read; a new mtime means a hash; --rehash finds what stat misses."""
    from maskbank.flows.planning import CHANGED, DONE, NEW
    from maskbank.flows.prepare import prepare_bank

    src, bank = tmp_path / "in", tmp_path / "bank"
    for i in range(3):
        _plain_nifti(src, f"s{i}", seed=i)
    args = ([str(src)], str(bank), CONFIG)
    assert prepare_bank(*args, progress=False)["counts"]["ok"] == 3
    row = Bank.open(bank).row("s0")
    assert row["source_stat"]["image"]["size"] == (src / "s0.nii").stat().st_size
    assert _plan([str(src)], bank).counts() == {NEW: 0, CHANGED: 0, DONE: 3}

    # the re-run submits no task, and its report still has a row per scan
    again = prepare_bank(*args, progress=False)
    assert _statuses(again) == dict.fromkeys(("s0", "s1", "s2"), "skipped")
    assert {r["seconds"] for r in again["scans"]} == {0.0}
    assert again["plan"] == {NEW: 0, CHANGED: 0, DONE: 3}

    # same content, new mtime: hashed, kept (proposals and all), size/mtime recorded
    token = Bank.open(bank).scan("s1").token
    os.utime(src / "s1.nii", ns=(1, 1_600_000_000_000_000_000))
    plan = _plan([str(src)], bank)
    assert [(i.scan.scan_id, i.category, i.reason) for i in plan.work] == [
        ("s1", CHANGED, "source changed (size/mtime)")
    ]
    touched = prepare_bank(*args, progress=False)
    assert _statuses(touched)["s1"] == "skipped"
    assert Bank.open(bank).scan("s1").token == token
    assert "recorded" in {r["scan_id"]: r for r in touched["scans"]}["s1"]["reason"]
    assert _plan([str(src)], bank).counts()[DONE] == 3
    assert Bank.open(bank).verify() == []

    # a new content under the same path (new mtime): redone
    _plain_nifti(src, "s2", seed=22)
    redo = prepare_bank(*args, progress=False)
    assert _statuses(redo) == {"s0": "skipped", "s1": "skipped", "s2": "ok"}
    assert Bank.open(bank).row("s2")["source_sha256"] != row["source_sha256"]

    # a new content of the same size with the old mtime put back: only --rehash sees it
    st = (src / "s0.nii").stat()
    _plain_nifti(src, "s0", seed=30)
    os.utime(src / "s0.nii", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (src / "s0.nii").stat().st_size == st.st_size
    assert _plan([str(src)], bank).counts()[DONE] == 3
    missed = prepare_bank(*args, progress=False)
    assert _statuses(missed)["s0"] == "skipped"
    caught = prepare_bank(*args, progress=False, rehash=True)
    assert _statuses(caught) == {"s0": "ok", "s1": "skipped", "s2": "skipped"}
    assert Bank.open(bank).verify() == []


def test_grown_folder_prepares_only_the_new_scans(prefect_api: str, tmp_path: Path) -> None:
    from maskbank.flows.prepare import prepare_bank

    src, bank = tmp_path / "in", tmp_path / "bank"
    for i in range(4):
        write_phantom(src, f"old{i}", seed=i)
    args = ([str(src)], str(bank), CONFIG)
    prepare_bank(*args, progress=False)
    write_phantom(src, "new0", seed=10)
    dry = prepare_bank(*args, progress=False, dry_run=True)
    assert dry["dry_run"] and dry["plan"]["counts"] == {"new": 1, "changed": 0, "done": 4}
    assert [r["scan_id"] for r in dry["plan"]["new"]] == ["new0"] and dry["scans"] == []
    assert "new0" not in Bank.open(bank)  # a dry run writes nothing
    grown = prepare_bank(*args, progress=False)
    ok = [r["scan_id"] for r in grown["scans"] if r["status"] == "ok"]
    assert ok == ["new0"] and grown["counts"] == {"ok": 1, "skipped": 4, "failed": 0}


def test_a_bad_scan_fails_alone_in_its_batch(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corrupt, 4D and NaN scans share one task with good ones: each has its own outcome."""
    from prefect_dask import DaskTaskRunner

    from maskbank.flows.prepare import prepare_bank

    bad = write_bad_inputs(tmp_path / "in")
    for i in range(3):
        write_phantom(tmp_path / "in", f"good{i}", seed=i)
    submitted = []
    submit = DaskTaskRunner.submit

    def counting(self, task, parameters, *a, **kw):
        submitted.append(parameters.get("size"))
        return submit(self, task, parameters, *a, **kw)

    monkeypatch.setattr(DaskTaskRunner, "submit", counting)
    report = prepare_bank(
        [str(tmp_path / "in")], str(tmp_path / "bank"), CONFIG, progress=False, batch=100
    )
    n = len(report["scans"])
    assert n == len(bad) + 3 and submitted == [n]  # one task for every scan
    by_id = {r["scan_id"]: r for r in report["scans"]}
    assert {by_id[f"good{i}"]["status"] for i in range(3)} == {"ok"}
    for name in ("series4d", "with_nans", "truncated"):
        assert by_id[name]["status"] == "failed" and by_id[name]["reason"], by_id[name]
    assert report["counts"]["failed"] == n - 3
    assert Bank.open(tmp_path / "bank").verify() == []


def test_proposals_are_planned_and_batched(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect_dask import DaskTaskRunner

    from maskbank.flows.prepare import prepare_bank
    from maskbank.flows.propose import propose_bank

    src = tmp_path / "in"
    for i in range(4):
        write_phantom(src, f"p{i}", seed=i)
    bank = str(tmp_path / "bank")
    prepare_bank([str(src)], bank, CONFIG, progress=False)
    cfg = {"generators": ["supervoxels"], "scales": [40], "max_proposals": 30}
    submitted = []
    submit = DaskTaskRunner.submit

    def counting(self, task, parameters, *a, **kw):
        submitted.append(parameters.get("size"))
        return submit(self, task, parameters, *a, **kw)

    monkeypatch.setattr(DaskTaskRunner, "submit", counting)
    first = propose_bank(bank, cfg, progress=False, batch=2, scan_ids=["p0", "p1", "p2"])
    assert first["counts"] == {"ok": 3, "skipped": 0, "failed": 0} and submitted == [2, 1]
    dry = propose_bank(bank, cfg, progress=False, dry_run=True)
    assert dry["plan"]["counts"] == {"work": 1, "done": 3} and dry["plan"]["work"] == ["p3"]
    again = propose_bank(bank, cfg, progress=False)
    assert _statuses(again) == {"p0": "skipped", "p1": "skipped", "p2": "skipped", "p3": "ok"}
    assert submitted == [2, 1, 1]  # only the one scan without proposals became a task
    by_id = {r["scan_id"]: r for r in again["scans"]}
    assert by_id["p0"]["n_proposals"] == first["scans"][0]["n_proposals"]


def test_dry_run_prints_the_plan(tmp_path: Path) -> None:
    from tests.flows.cli_run import maskbank

    write_phantom(tmp_path / "in", "alpha")
    out = maskbank("prepare", str(tmp_path / "in"), "--bank", str(tmp_path / "b"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "alpha_label.nii.gz" in out.stdout and "new" in out.stdout
    assert "plan: 1 new, 0 changed, 0 done: 1 scans would be prepared" in out.stdout
    assert not (tmp_path / "b").exists()
    shutil.rmtree(tmp_path / "in")


def test_scans_from_before_stat_records_are_hashed_once(prefect_api: str, tmp_path: Path) -> None:
    """A bank written without size/mtime records: the first run hashes and records them
    (keeping every scan as it is), the next one plans them done without reading."""
    from maskbank.flows.planning import DONE
    from maskbank.flows.prepare import prepare_bank
    from tests.flows.scans import phantom_bank

    bank = phantom_bank(tmp_path, "inputs", "inputs")
    before = Bank.open(bank)
    tokens = {s: before.scan(s).token for s in before.scan_ids}
    assert {before.row(s)["source_stat"] for s in tokens} == {None}
    plan = _plan([str(tmp_path / "inputs")], bank)
    assert {i.reason for i in plan.work} == {"no size/mtime recorded"}
    first = prepare_bank([str(tmp_path / "inputs")], str(bank), CONFIG, progress=False)
    assert first["counts"] == {"ok": 0, "skipped": 3, "failed": 0}
    after = Bank.open(bank)
    assert {s: after.scan(s).token for s in after.scan_ids} == tokens
    assert _plan([str(tmp_path / "inputs")], bank).counts()[DONE] == 3
    assert after.verify() == []


def test_a_handed_plan_brings_the_bank_it_was_planned_on(tmp_path: Path) -> None:
    """The flow of a command that planned first takes the command's open bank (one index
    parse, not two) -- only a writable one, of the same bank, within the block."""
    from maskbank.bank.writing import resolve_location
    from maskbank.flows.planning import ProposalPlan, hand_over, handed_bank, plan_proposals

    store = Bank.create(tmp_path / "b")
    where = resolve_location(str(tmp_path / "b"))
    plan = ProposalPlan(where, [], "fp", "default", False, {})
    with hand_over(plan, store):
        assert handed_bank(ProposalPlan, where) is store
        assert handed_bank(ProposalPlan, str(tmp_path / "other")) is None
        assert plan_proposals(store, where, [], "fp") is plan  # the plan is taken once ...
        assert handed_bank(ProposalPlan, where) is None  # ... and its bank with it
    with hand_over(plan, Bank.open(tmp_path / "b")):  # read-only: the flow opens its own
        assert handed_bank(ProposalPlan, where) is None
    assert handed_bank(ProposalPlan, where) is None


def test_a_command_into_a_new_bank_creates_it_once(
    prefect_api: str, tmp_path: Path, monkeypatch
) -> None:
    """The command creates (and recovers) the bank it plans against and its flow takes that
    one, also while it is empty (an empty `Bank` is falsy: the flow checks `is None`)."""
    from maskbank.flows.cli import main

    src, bank = tmp_path / "in", tmp_path / "bank"
    write_phantom(src, "a", seed=0)
    created = []
    real_create = Bank.create.__func__
    monkeypatch.setattr(Bank, "create", classmethod(lambda cls, *a, **k: created.append(a) or
                                                      real_create(cls, *a, **k)))  # fmt: skip
    argv = ["prepare", str(src), "--bank", str(bank), "--spacing", "3", "--no-progress"]
    assert main([*argv, "--workers", "1"]) == 0
    assert len(created) == 1 and "a" in Bank.open(bank)
