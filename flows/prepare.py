"""The `prepare_bank` Prefect flow: many raw scans -> one bank, one Dask task per scan.

Failure policy (`flows.per_scan`, shared by every flow): a `ScanError` (bad input)
becomes a `failed` outcome and is never retried; an OSError (flaky network disk, NFS
hiccup) is retried by Prefect; any other exception fails only its own scan. The flow
itself fails only when the inputs cannot be listed or the bank cannot be opened.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger

from maskbank.bank import Bank
from maskbank.bank.errors import NotABankError, StaleScanError
from maskbank.bank.writing import record_scan_attrs, resolve_location, scan_token_of
from maskbank.flows.inputs import ScanInput
from maskbank.flows.outcomes import PATH_FIELDS, redact_names  # noqa: F401 (re-exported)
from maskbank.flows.per_scan import (
    Cluster,
    RunClock,
    ScanOutcome,
    open_bank,
    per_scan_task,
    run_report,
    run_scans,
    seconds_since,
)
from maskbank.flows.planning import (  # noqa: F401 (SKIPPED, planned_skip: re-exported)
    CHANGED,
    DONE,
    NEW,
    SKIPPED,
    PrepareRun,
    handed_bank,
    plan_prepare_run,
    planned_skip,
    propose_cost_s,
    source_stat,
)
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.label_names import name_conflicts
from maskbank.pipeline.reader import sha256_of


def _outcome(item: ScanInput, status: str, t0: float, **details) -> ScanOutcome:
    reason = details.pop("reason", None)
    details = {"image": item.image, "label": item.label, **details}
    return ScanOutcome(item.scan_id, status, reason, seconds_since(t0), details=details)


def _existing_attrs(bank: Bank, scan_id: str) -> dict | None:
    """The scan's attributes as stored now (not as the index said when the bank was opened)."""
    try:
        return bank.read_scan_attrs(scan_id)
    except Exception:  # a half-broken scan is simply redone
        return None


def _why_redo(old: dict | None, new: dict, image: str, scan_id: str) -> str | None:
    """None when the stored scan already matches; else a short reason for the report.

    Raises ScanError when the id already holds a *different* file with different
    content: ids come from file stems, so a later run on another folder must not
    silently replace an earlier run's scan.
    """
    if old is None:
        return "new"
    old_path = old.get("source_path")
    if (
        old_path
        and old_path != str(Path(image).resolve())
        and old.get("source_sha256") != new["source_sha256"]
    ):
        raise ScanError(
            image,
            f"scan id {scan_id!r} already holds a different scan ({old_path}); give this one "
            "another id (manifest column scan_id) or delete the old one first",
        )
    for key, label in (
        ("source_sha256", "source changed"),
        ("label_sha256", "label changed"),
        ("label_names_sha256", "label names changed"),
        ("fingerprint", "config changed"),
        ("dataset", "dataset changed"),
    ):
        if old.get(key) != new.get(key):
            return label
    if (old.get("metadata") or {}) != (new.get("metadata") or {}):  # absent in older banks
        return "metadata changed"
    return None


@per_scan_task("prepare")
def prepare_one(
    scan_id: str,
    item: dict,
    bank: str,
    config: dict,
    proposals: dict | None = None,
    stat: dict | None = None,
    new: bool = False,
    proposals_only: bool = False,
) -> ScanOutcome:
    """Prepare one scan and publish it; skip it when the bank already holds this exact result.

    With ``proposals`` (a ``ProposalConfig.to_dict()``) the same task then makes the
    scan's mask proposals, which are skipped in turn when already up to date;
    ``proposals_only``: the plan found the scan itself done, only its proposals are work.
    """
    t0 = time.perf_counter()
    if proposals_only:
        scan = ScanInput.from_dict(item)
        outcome = _outcome(scan, "skipped", t0, reason=SKIPPED)
    else:
        outcome = prepare_record(scan_id, item, bank, config, stat, new)
    if proposals is None or outcome.status == "failed":
        return outcome
    return replace(with_proposals(outcome, bank, proposals), seconds=seconds_since(t0))


def with_proposals(outcome: ScanOutcome, bank: str, proposals: dict) -> ScanOutcome:
    """A prepared scan's outcome after making its proposals (`flows.propose.propose_scan`)."""
    from maskbank.flows.propose import propose_scan
    from maskbank.pipeline.proposals.engine import ProposalConfig

    cfg = ProposalConfig.from_dict(proposals)
    store = open_bank(bank)
    if outcome.scan_id not in store:
        store.refresh()
    try:
        made = propose_scan(store, outcome.scan_id, cfg)
    except ValueError as exc:  # an unusable scan for proposals (e.g. no structure at all)
        return replace(outcome, status="failed", reason=f"proposals: {exc}")
    return outcome.with_details(
        proposals=made.status,
        n_proposals=made.details.get("n_proposals"),
        bytes_per_proposal=made.details.get("bytes_per_proposal"),
    )


def prepare_record(
    scan_id: str,
    item: dict,
    bank: str,
    config: dict,
    stat: dict | None = None,
    new: bool = False,
) -> ScanOutcome:
    """Prepare and publish one scan (a `ScanInput.to_dict()`) unless the bank holds it already.

    ``stat`` (`planning.source_stat`, taken before the files are read) is recorded with
    the scan. ``new``: the plan found no scan under this id, so the source is hashed as it
    is read instead of before; otherwise it is hashed first and compared with the stored
    scan (equal content and settings: skipped, the new size/mtime recorded).
    """
    from maskbank.pipeline.prepare import prepare_scan  # here: a run with no work never loads it

    t0 = time.perf_counter()
    scan = ScanInput.from_dict(item)
    cfg = PrepareConfig.from_dict(config)
    if scan.modality:
        cfg = cfg.replace(modality=scan.modality)
    dataset = scan.dataset or "default"
    try:
        names = scan.label_names if scan.label else None  # names without a label: nothing to name
        for path, what in ((scan.image, "image"), (scan.label, "label"), (names, "label names")):
            if path and not os.path.exists(path):
                raise ScanError(path, f"{what} file not found")
        if stat is None:
            stat = source_stat(scan, keep_paths=cfg.id_from != "hash")
        store = open_bank(bank)
        wanted = None
        if not new:
            wanted = _wanted(scan, cfg, dataset, names, sha256_of(scan.image))
            # Cheap check first (most re-runs skip); checked again under the scan's lock below.
            old = _existing_attrs(store, scan_id)
            if _why_redo(old, wanted, scan.image, scan_id) is None:
                return _outcome(scan, "skipped", t0, reason=_kept(store, scan_id, old, stat))
        prepared = prepare_scan(
            scan.image,
            scan.label,
            config=cfg,
            dataset=dataset,
            source_sha256=wanted["source_sha256"] if wanted else None,
            label_names=names,
            metadata=scan.metadata,
        )
        prepared.attrs["source_stat"] = stat
        if wanted is None:
            wanted = _wanted(scan, cfg, dataset, names, prepared.attrs["source_sha256"])
            wanted["label_sha256"] = prepared.attrs.get("label_sha256")
        with store.scan_lock(scan_id):
            # Another task or run may have written this id while we prepared (same file:
            # keep it and its proposals; another file: refuse, as above).
            old = _existing_attrs(store, scan_id)
            why = _why_redo(old, wanted, scan.image, scan_id)
            if why is None:
                reason = f"{SKIPPED} (written concurrently)"
                return _outcome(scan, "skipped", t0, reason=reason)
            store.write_scan(scan_id, prepared.arrays(), prepared.attrs)
        return _outcome(
            scan,
            "ok",
            t0,
            note=why,
            modality=prepared.attrs.get("modality"),
            shape=list(prepared.image.shape),
        )
    except ScanError as exc:
        return _outcome(scan, "failed", t0, reason=exc.reason, file=exc.path)


def _wanted(
    scan: ScanInput, cfg: PrepareConfig, dataset: str, names: str | None, source_sha256: str
) -> dict:
    """What the stored scan must match to be kept."""
    return {
        "source_sha256": source_sha256,
        "label_sha256": sha256_of(scan.label) if scan.label else None,
        "label_names_sha256": sha256_of(names) if names else None,
        "fingerprint": cfg.fingerprint(),
        "dataset": dataset,
        "metadata": scan.metadata or {},
    }


def _kept(store: Bank, scan_id: str, old: dict | None, stat: dict) -> str:
    """The reason of a skip after hashing; records the inputs' size/mtime with the scan
    where the bank can, so the next run skips it without reading the files."""
    if (old or {}).get("source_stat") == stat:
        return SKIPPED
    try:
        recorded = record_scan_attrs(
            store, scan_id, {"source_stat": stat}, scan_token=scan_token_of(old or {})
        )
    except StaleScanError:  # rewritten meanwhile: the next run looks again
        recorded = False
    if not recorded:  # an object store: the next run hashes it again
        return f"{SKIPPED}; content unchanged"
    return f"{SKIPPED}; content unchanged, size/mtime recorded"


def label_name_conflicts(bank_path: str, datasets: set[str | None]) -> list[str]:
    """Names that disagree within the datasets this run wrote to (old scans included)."""
    store = Bank.open(bank_path)
    rows = [
        r
        for r in store.index
        if r.get("has_label") and (None in datasets or r.get("dataset") in datasets)
    ]
    return name_conflicts(
        (r["scan_id"], r.get("dataset") or "default", store.scan(r["scan_id"]).label_names)
        for r in rows
    )


@flow(name="prepare-bank", validate_parameters=True)
def prepare_bank(
    inputs: list[str],
    bank: str,
    config: dict | None = None,
    workers: int = 2,
    dask_address: str | None = None,
    dataset: str | None = None,
    processes: bool = False,
    progress: bool = True,
    proposals: dict | None = None,
    label_names: str | None = None,
    batch: int | None = None,
    rehash: bool = False,
    dry_run: bool = False,
) -> dict:
    """Prepare every scan found in `inputs` into the bank at `bank`; return the run report.

    `config` is a `PrepareConfig.to_dict()` (defaults when None); `proposals` a
    `ProposalConfig.to_dict()` to make proposals in the same tasks; `label_names` a
    names file for every labelled scan whose manifest row names none. The run is
    planned first (`flows.planning`): only new and changed scans become work, in
    batches of `batch` scans (default: by estimated cost); `rehash` compares every
    source's SHA-256, not only those whose size or mtime changed; `dry_run` returns the
    plan (``report["plan"]``) without running anything. The report is also stored in
    the bank (reports/prepare-<time>.json); its path is `report["report_path"]`.
    """
    logger = get_run_logger()
    clock = RunClock()
    cfg = PrepareConfig.from_dict(config or {})
    bank_path = resolve_location(bank)  # a URL stays as it is
    store = handed_bank(PrepareRun, bank_path)  # (an empty Bank is falsy: `is None`)
    if store is None:
        store = _open_for_plan(bank, dry_run)
    # plain code; a CLI that planned this very run first hands its plan over (`hand_over`)
    run = plan_prepare_run(
        store,
        bank_path,
        list(inputs),
        cfg,
        dataset,
        label_names,
        rehash=rehash,
        proposals=proposals,
    )
    scans, rows, plan = run.scans, run.rows, run.plan
    settings = run.settings(cfg.to_dict(), cfg.fingerprint(), workers, dask_address, label_names)
    if dry_run:
        report = run_report("prepare", bank_path, clock, settings, [])
        report["plan"] = plan.to_json()
        report["plan"]["proposals_work"] = (
            len(plan.work) + len(plan.of(DONE)) - len(run.done_proposals) if proposals else None
        )
        report["dry_run"] = True
        return report
    logger.info("preparing %d scans into %s: %s", len(scans), bank_path, _plan_words(plan.counts()))
    params, costs = {}, {}
    for item in run.work:
        s = item.scan
        params[s.scan_id] = {
            "scan_id": s.scan_id,
            "item": s.to_dict(),
            "bank": bank_path,
            "config": cfg.to_dict(),
            "proposals": proposals,
            "stat": item.stat,
            "new": item.category == NEW,
            "proposals_only": item.category == DONE,
        }
        costs[s.scan_id] = item.cost_s + (propose_cost_s(rows.get(s.scan_id)) if proposals else 0.0)
    report = run_scans(
        "prepare",
        prepare_one,
        params,
        store if store is not None else Bank.create(bank),
        bank_path=bank_path,
        cluster=Cluster(workers, dask_address, processes),
        settings=settings,
        clock=clock,
        progress=progress,
        crash_details={
            s.scan_id: {"image": s.image, "label": s.label, "file": s.image} for s in scans
        },
        # a shared report names no file or folder either
        redact=run.redact,
        costs=costs,
        batch=batch,
        planned=run.settled(),
        order=[s.scan_id for s in scans],
    )
    logger.info("prepare done: %s; report %s", report["counts"], report["report_path"])
    # datasets this run wrote labels to (a run that wrote none cannot add a disagreement)
    written = {s.dataset for s in scans if s.scan_id in params and s.label}
    report["label_name_conflicts"] = label_name_conflicts(bank_path, written) if written else []
    for message in report["label_name_conflicts"]:
        print(
            f"warning: label names disagree, {message}; evaluation will refuse this dataset "
            "unless `--label-names FILE` names the values",
            file=sys.stderr,
        )
    for r in report["scans"]:  # INFO: the CLI prints its own table; served runs log at INFO
        if r["status"] == "failed":
            logger.info("failed %s (%s): %s", r["scan_id"], r.get("file"), r["reason"])
    return report


def _open_for_plan(bank: str, dry_run: bool) -> Bank | None:
    """The bank to plan against: created (and recovered) for a run; for a dry run only
    opened, and None where there is none yet (every input is then new)."""
    if not dry_run:
        return Bank.create(bank)  # also finishes/undoes writes a killed run left behind
    try:
        return Bank.open(bank)
    except NotABankError:
        return None


def _plan_words(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in (NEW, CHANGED, DONE))
