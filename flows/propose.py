"""The `propose_bank` Prefect flow: mask proposals for every scan of a bank, one Dask task each.

Each task reads one scan's image and body from the bank, runs
`pipeline.proposals.engine.generate_proposals` and publishes the proposals part
atomically.  A scan whose stored proposals were made with the same config
fingerprint from the same scan version is skipped, so re-runs are cheap and a
changed option redoes every scan.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.futures import as_completed

from bank import Bank
from bank.errors import StaleScanError
from bank.proposals import ProposalReader, write_proposals
from flows.prepare import (
    PER_SCAN_TASK_OPTIONS,
    _exception_of,
    make_task_runner,
    shared_torch_threads,
    summarise_records,
)
from pipeline.normalize import invert_normalization
from pipeline.proposals.engine import ProposalConfig, generate_proposals

# A scan rewritten while its proposals were made: make them again from the new version.
STALE_RETRIES = 2


def scan_version(scan: Any) -> str:
    """What the proposals derive from: source hash, prepare fingerprint, write time and token."""
    a = scan.attrs
    bits = [a.get("source_sha256"), a.get("fingerprint"), scan.info.get("written_at")]
    if scan.info.get("token"):
        bits.append(scan.info["token"])
    return "|".join(str(x) for x in bits)


def raw_image(scan: Any) -> np.ndarray:
    """The scan's image in raw units (HU for CT) when the normalisation is recorded."""
    img = np.asarray(scan.read("image"), dtype=np.float32)
    norm = scan.attrs.get("normalization")
    return invert_normalization(img, norm) if norm else img


def propose_scan(store: Bank, scan_id: str, cfg: ProposalConfig, force: bool = False) -> dict:
    """Make and store one scan's proposals (or skip them when up to date); return a record.

    The write names the scan version the proposals were made from; when a concurrent
    prepare rewrote the scan meanwhile they are made again from the new version.
    """
    t0 = time.perf_counter()
    for attempt in range(STALE_RETRIES + 1):
        try:
            rec = _propose_once(store, scan_id, cfg, force)
        except StaleScanError as exc:
            if attempt == STALE_RETRIES:
                rec = {"scan_id": scan_id, "status": "failed", "reason": str(exc)}
                break
            force = False  # the new version has no proposals: nothing to skip
            continue
        break
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _propose_once(store: Bank, scan_id: str, cfg: ProposalConfig, force: bool) -> dict:
    t0 = time.perf_counter()
    scan = store.scan(scan_id)
    version = scan_version(scan)
    old = scan.proposals_attrs
    if (
        not force
        and old
        and old.get("fingerprint") == cfg.fingerprint()
        and old.get("scan_version") == version
    ):
        return {
            "scan_id": scan_id,
            "status": "skipped",
            "reason": "proposals up to date (same config and scan)",
            "n_proposals": int(old.get("n_proposals", 0)),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    body = np.asarray(scan.read("body"), dtype=bool) if scan.has("body") else None
    image = raw_image(scan)
    if body is None:
        body = np.ones(image.shape, bool)
    modality = scan.modality or "mr"
    timings: dict = {}
    ps = generate_proposals(image, body, scan.spacing, modality, cfg, timings=timings)
    write_proposals(
        store,
        scan_id,
        ps,
        {
            "config": cfg.to_dict(),
            "fingerprint": cfg.fingerprint(),
            "scan_version": version,
            "modality": modality,
            "timings": {k: round(float(v), 3) for k, v in timings.items()},
        },
        scan_token=scan.token,
    )
    nbytes = ProposalReader(store.scan(scan_id)).nbytes_stored()
    return {
        "scan_id": scan_id,
        "status": "ok",
        "reason": None,
        "n_proposals": ps.count,
        "bytes_per_proposal": round(nbytes / max(ps.count, 1), 1),
        "seconds": round(time.perf_counter() - t0, 3),
    }


@task(name="propose-scan", task_run_name="propose-{scan_id}", **PER_SCAN_TASK_OPTIONS)
def propose_one(scan_id: str, bank: str, config: dict, force: bool = False) -> dict:
    """One Dask task: proposals for one scan."""
    store = Bank.open(bank, mode="a")
    return propose_scan(store, scan_id, ProposalConfig.from_dict(config), force)


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
) -> dict:
    """Make proposals for the scans of an existing bank; return (and store) the run report."""
    from tqdm import tqdm

    logger = get_run_logger()
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    cfg = ProposalConfig.from_dict(config or {})
    store = Bank.open(bank, mode="a")
    ids = list(scan_ids) if scan_ids else store.scan_ids
    missing = [s for s in ids if s not in store]
    if missing:
        raise ValueError(f"scans not in the bank: {missing}")
    bank_path = str(Path(bank).expanduser().resolve())
    records: list[dict] = []
    with (
        shared_torch_threads(workers, dask_address, processes),
        make_task_runner(workers, dask_address, processes) as runner,
    ):
        futures = {
            runner.submit(
                propose_one,
                {"scan_id": s, "bank": bank_path, "config": cfg.to_dict(), "force": force},
            ): s
            for s in ids
        }
        with tqdm(total=len(ids), desc="propose", unit="scan", disable=not progress) as bar:
            for fut in as_completed(list(futures)):
                sid = futures[fut]
                fut.wait()
                if fut.state.is_completed():
                    rec = fut.result()
                else:
                    exc = _exception_of(fut.state)
                    reason = f"{type(exc).__name__}: {exc}" if exc else "task failed"
                    rec = {"scan_id": sid, "status": "failed", "reason": reason}
                records.append(rec)
                bar.set_postfix(summarise_records(records), refresh=False)
                bar.update(1)
    store.rebuild_index()
    order = {s: i for i, s in enumerate(ids)}
    records.sort(key=lambda r: order[r["scan_id"]])
    report = {
        "flow": "propose",
        "bank": bank_path,
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "config": cfg.to_dict(),
        "fingerprint": cfg.fingerprint(),
        "counts": summarise_records(records),
        "scans": records,
    }
    report["report_path"] = store.write_report("propose", report)
    logger.info("propose done: %s", report["counts"])
    return report
