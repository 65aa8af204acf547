"""The `propose_bank` Prefect flow: mask proposals for every scan of a bank, in batches on Dask.

The run is planned first: a scan whose stored proposals were made with the same config
fingerprint from the same scan version is done without a task, so re-runs are cheap
and a changed option redoes every scan. Each remaining scan reads its image and body
from the bank, runs `pipeline.proposals.engine.generate_proposals` and publishes the
proposals part atomically; scans run in batches (`flows.per_scan`), each with its own
outcome.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
from prefect import flow, get_run_logger

from maskbank.bank import Bank
from maskbank.bank.errors import StaleScanError
from maskbank.bank.sampling import ProposalReader
from maskbank.bank.writing import proposal_nbytes, resolve_location, write_proposals
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
from maskbank.flows.planning import (
    UP_TO_DATE,
    ProposalPlan,
    handed_bank,
    plan_proposals,
    propose_cost_s,
    scan_version,
)
from maskbank.pipeline.proposals.config import ProposalConfig

__all__ = ["propose_bank", "propose_one", "propose_scan", "raw_image", "scan_version"]

# A scan rewritten while its proposals were made: make them again from the new version.
STALE_RETRIES = 2


def raw_image(scan: Any) -> np.ndarray:
    """The scan's image in raw units (HU for CT) when the normalisation is recorded."""
    from maskbank.pipeline.normalize import invert_normalization  # imports torch

    img = np.asarray(scan.read("image"), dtype=np.float32)
    norm = scan.attrs.get("normalization")
    return invert_normalization(img, norm) if norm else img


def propose_scan(
    store: Bank, scan_id: str, cfg: ProposalConfig, force: bool = False, name: str = "default"
) -> ScanOutcome:
    """Make and store one scan's proposals as set ``name`` (or skip them when up to date).

    The write names the scan version the proposals were made from; when a concurrent
    prepare rewrote the scan meanwhile they are made again from the new version.
    """
    t0 = time.perf_counter()
    for attempt in range(STALE_RETRIES + 1):
        try:
            outcome = _propose_once(store, scan_id, cfg, force, name)
        except StaleScanError as exc:
            if attempt == STALE_RETRIES:
                outcome = ScanOutcome(scan_id, "failed", str(exc))
                break
            force = False  # the new version has no proposals: nothing to skip
            continue
        break
    return replace(outcome, seconds=seconds_since(t0))


def _propose_once(
    store: Bank, scan_id: str, cfg: ProposalConfig, force: bool, name: str
) -> ScanOutcome:
    scan = store.scan(scan_id)
    version = scan_version(scan)
    old = scan.proposal_set_attrs(name)
    if (
        not force
        and old
        and old.get("fingerprint") == cfg.fingerprint()
        and old.get("scan_version") == version
    ):
        n = int(old.get("n_proposals", 0))
        return ScanOutcome(scan_id, "skipped", UP_TO_DATE, details={"n_proposals": n})
    body = np.asarray(scan.read("body"), dtype=bool) if scan.has("body") else None
    image = raw_image(scan)
    if body is None:
        body = np.ones(image.shape, bool)
    modality = scan.modality or "mr"
    # The engine (torch, torch_geometric: seconds to import) loads where work starts.
    from maskbank.pipeline.proposals.budget import fit_byte_budget, longest_report
    from maskbank.pipeline.proposals.engine import generate_proposals

    timings: dict = {}
    ps = generate_proposals(image, body, scan.spacing, modality, cfg, timings=timings)
    attrs = {
        "config": cfg.to_dict(),
        "fingerprint": cfg.fingerprint(),
        "scan_version": version,
        "modality": modality,
        "timings": {k: round(float(v), 3) for k, v in timings.items()},
        # the budget holds on the stored bytes, these attributes included
        "byte_budget": longest_report(ps, cfg.max_bytes_per_proposal),
    }
    ps, budget = fit_byte_budget(
        ps,
        lambda p: proposal_nbytes(p, store.encoding, attrs, name),
        cfg.max_bytes_per_proposal,
    )
    write_proposals(
        store, scan_id, ps, {**attrs, "byte_budget": budget}, scan_token=scan.token, name=name
    )
    nbytes = ProposalReader(store.scan(scan_id), name).nbytes_stored()
    details = {"n_proposals": ps.count, "bytes_per_proposal": round(nbytes / max(ps.count, 1), 1)}
    note = None
    if budget["dropped"]:  # say what the byte budget cost, so a user can raise it
        layers = ", ".join(budget["dropped_layers"])
        note = f"byte budget: dropped layer(s) {layers} ({budget['dropped']} proposals)"
    return ScanOutcome(scan_id, "ok", note, details=details)


@per_scan_task("propose")
def propose_one(
    scan_id: str, bank: str, config: dict, force: bool = False, name: str = "default"
) -> ScanOutcome:
    """One scan's proposals (the scans of a batch share one open bank)."""
    store = open_bank(bank)
    if scan_id not in store:  # written after this batch's bank was opened
        store.refresh()
    return propose_scan(store, scan_id, ProposalConfig.from_dict(config), force, name)


@flow(name="propose-bank", validate_parameters=True)
def propose_bank(
    bank: str,
    config: dict | None = None,
    scan_ids: list[str] | None = None,
    workers: int = 2,
    dask_address: str | None = None,
    processes: bool = False,
    force: bool = False,
    progress: bool = True,
    name: str = "default",
    batch: int | None = None,
    dry_run: bool = False,
) -> dict:
    """Make proposals (set ``name``) for the scans of a bank; return (and store) the report.

    Planned first: scans whose set was made with this config from the scan as stored
    now are done without a task (`planning.proposals_up_to_date`); the rest run in
    batches of ``batch`` scans (default: by estimated cost). ``dry_run`` returns the
    plan (``report["plan"]``) and runs nothing.
    """
    logger = get_run_logger()
    clock = RunClock()
    cfg = ProposalConfig.from_dict(config or {})
    bank_path = resolve_location(bank)  # a URL stays as it is
    store = handed_bank(ProposalPlan, bank_path)  # (an empty Bank is falsy: `is None`)
    if store is None:
        store = Bank.open(bank, mode="a")
    ids = list(scan_ids) if scan_ids else store.scan_ids
    missing = [s for s in ids if s not in store]
    if missing:
        raise ValueError(f"scans not in the bank: {missing}")
    plan = plan_proposals(store, bank_path, ids, cfg.fingerprint(), name, force)
    rows = store.index_rows
    settings = plan.settings(cfg.to_dict())
    if dry_run:
        report = run_report("propose", bank_path, clock, settings, [])
        return {**report, "plan": {"counts": plan.counts(), "work": plan.work}, "dry_run": True}
    logger.info(
        "proposals for %d scans: %d to make, %d up to date", len(ids), *plan.counts().values()
    )
    params = {
        s: {"scan_id": s, "bank": bank_path, "config": cfg.to_dict(), "force": force, "name": name}
        for s in plan.work
    }
    report = run_scans(
        "propose",
        propose_one,
        params,
        store,
        bank_path=bank_path,
        cluster=Cluster(workers, dask_address, processes),
        settings=settings,
        clock=clock,
        progress=progress,
        costs={s: propose_cost_s(rows.get(s)) for s in params},
        batch=batch,
        planned=plan.settled(),
        order=ids,
    )
    logger.info("propose done: %s", report["counts"])
    return report
