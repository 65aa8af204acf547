"""The `prepare_bank` Prefect flow: many raw scans -> one bank, one Dask task per scan.

Failure policy: a `ScanError` (bad input) becomes a `failed` record and is never
retried; an OSError (flaky network disk, NFS hiccup) is retried by Prefect; any
other exception fails only its own scan. The flow itself fails only when the
inputs cannot be listed or the bank cannot be opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner

from bank import Bank
from flows.inputs import ScanInput, collect_inputs
from pipeline.config import PrepareConfig
from pipeline.errors import ScanError
from pipeline.prepare import prepare_scan
from pipeline.reader import sha256_of

TASK_RETRIES = 2
RETRY_DELAYS_S = [1, 4]


def _exception_of(state: Any) -> BaseException | None:
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        result = state.result(raise_on_failure=False)
    except Exception as exc:  # the result itself could not be loaded
        return exc
    return result if isinstance(result, BaseException) else None


def retry_transient_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: only OSErrors that are not a bad-input `ScanError`."""
    exc = _exception_of(state)
    return isinstance(exc, OSError) and not isinstance(exc, ScanError)


# Every per-scan task (prepare, propose): retry transient I/O only, the bank is the cache.
PER_SCAN_TASK_OPTIONS = {
    "retries": TASK_RETRIES,
    "retry_delay_seconds": RETRY_DELAYS_S,
    "retry_condition_fn": retry_transient_io,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


def _record(item: ScanInput, status: str, t0: float, **extra: Any) -> dict:
    return {
        "scan_id": item.scan_id,
        "image": item.image,
        "label": item.label,
        "status": status,
        "reason": extra.pop("reason", None),
        "seconds": round(time.perf_counter() - t0, 3),
        "worker": f"{socket.gethostname()}:{os.getpid()}",  # where it ran, for cluster debugging
        **extra,
    }


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


@task(name="prepare-scan", task_run_name="prepare-{scan_id}", **PER_SCAN_TASK_OPTIONS)
def prepare_one(
    scan_id: str, item: dict, bank: str, config: dict, proposals: dict | None = None
) -> dict:
    """Prepare one scan and publish it; skip it when the bank already holds this exact result.

    With ``proposals`` (a ``ProposalConfig.to_dict()``) the same task then makes the
    scan's mask proposals, which are skipped in turn when already up to date.
    """
    t0 = time.perf_counter()
    record = _prepare_record(scan_id, item, bank, config)
    if proposals is not None and record["status"] != "failed":
        record.update(_propose_record(bank, scan_id, proposals))
        record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


def _propose_record(bank: str, scan_id: str, proposals: dict) -> dict:
    from flows.propose import propose_scan
    from pipeline.proposals.engine import ProposalConfig

    try:
        rec = propose_scan(Bank.open(bank, mode="a"), scan_id, ProposalConfig.from_dict(proposals))
    except ValueError as exc:  # an unusable scan for proposals (e.g. no structure at all)
        return {"status": "failed", "reason": f"proposals: {exc}"}
    return {
        "proposals": rec["status"],
        "n_proposals": rec.get("n_proposals"),
        "bytes_per_proposal": rec.get("bytes_per_proposal"),
    }


def _prepare_record(scan_id: str, item: dict, bank: str, config: dict) -> dict:
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
        wanted = {
            "source_sha256": sha256_of(scan.image),
            "label_sha256": sha256_of(scan.label) if scan.label else None,
            "label_names_sha256": sha256_of(names) if names else None,
            "fingerprint": cfg.fingerprint(),
            "dataset": dataset,
            "metadata": scan.metadata or {},
        }
        store = Bank.open(bank, mode="a")
        skipped = "already in the bank (same source, config)"
        # Cheap check first (most re-runs skip); checked again under the scan's lock below.
        why = _why_redo(_existing_attrs(store, scan_id), wanted, scan.image, scan_id)
        if why is None:
            return _record(scan, "skipped", t0, reason=skipped)
        prepared = prepare_scan(
            scan.image,
            scan.label,
            config=cfg,
            dataset=dataset,
            source_sha256=wanted["source_sha256"],
            label_names=names,
            metadata=scan.metadata,
        )
        with store.scan_lock(scan_id):
            # Another task or run may have written this id while we prepared (same file:
            # keep it and its proposals; another file: refuse, as above).
            why = _why_redo(_existing_attrs(store, scan_id), wanted, scan.image, scan_id)
            if why is None:
                return _record(scan, "skipped", t0, reason=f"{skipped} (written concurrently)")
            store.write_scan(scan_id, prepared.arrays(), prepared.attrs)
        return _record(
            scan,
            "ok",
            t0,
            note=why,
            modality=prepared.attrs.get("modality"),
            shape=list(prepared.image.shape),
        )
    except ScanError as exc:
        return _record(scan, "failed", t0, reason=exc.reason, file=exc.path)


def _threads_per_task(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, int(workers)))


@contextlib.contextmanager
def shared_torch_threads(workers: int, dask_address: str | None, processes: bool):
    """While a flow runs `workers` scans as threads of this process, give each scan's torch
    kernels (resampling) ``cpu_count // workers`` threads instead of every core each; the
    previous setting comes back afterwards (e.g. for pretraining in the same process)."""
    if dask_address or processes:  # other processes: sized by OMP_NUM_THREADS (see below)
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(_threads_per_task(workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_task_runner(workers: int, dask_address: str | None, processes: bool) -> DaskTaskRunner:
    """Join an existing Dask cluster, or start a LocalCluster of `workers` threads/processes.

    Threads are the default: numpy/scipy/zarr release the GIL in the heavy parts,
    and every thread shares the flow's Prefect API connection. Process workers need
    PREFECT_API_URL to point at a running server (see docs/cluster.md).
    """
    # The scheduler and workers of a local cluster log every connection at INFO.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    workers = max(1, int(workers))
    per_task = _threads_per_task(workers)
    if processes:
        kwargs = {
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "env": {"OMP_NUM_THREADS": str(per_task)},
        }
    else:
        kwargs = {"n_workers": 1, "threads_per_worker": workers, "processes": False}
    kwargs.update(dashboard_address=None, silence_logs=logging.WARNING)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


# Fields that name files, folders or hosts (patient identifiers hide in paths).
PATH_FIELDS = (
    "image",
    "label",
    "file",
    "label_names",
    "label_names_path",
    "source_path",
    "worker",
)


def redact_names(report: dict, scans: list[ScanInput]) -> dict:
    """The report without file, folder or host names (``--id-from hash``): ids stand for them.

    Path and host fields are dropped; a path inside a reason becomes the scan's id.
    """
    paths = {}
    for s in scans:
        for path in (s.image, s.label, s.label_names):
            if path:
                paths[str(path)] = s.scan_id
                paths[os.path.abspath(path)] = s.scan_id
    longest_first = sorted(paths, key=len, reverse=True)

    def scrub(text: str) -> str:
        for path in longest_first:
            text = text.replace(path, f"<{paths[path]}>")
        return text

    records = []
    for rec in report["scans"]:
        clean = {k: v for k, v in rec.items() if k not in PATH_FIELDS}
        if isinstance(clean.get("reason"), str):
            clean["reason"] = scrub(clean["reason"])
        records.append(clean)
    return {**report, "label_names": None, "dask_address": None, "scans": records}


def _failed_from_exception(item: ScanInput, exc: BaseException | None) -> dict:
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else "task failed"
    if isinstance(exc, OSError) and not isinstance(exc, ScanError):
        reason += f" (gave up after {TASK_RETRIES} retries)"
    rec = _record(item, "failed", time.perf_counter(), reason=reason, file=item.image)
    rec["seconds"] = None
    return rec


def summarise_records(records: list[dict]) -> dict[str, int]:
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


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
) -> dict:
    """Prepare every scan found in `inputs` into the bank at `bank`; return the run report.

    `config` is a `PrepareConfig.to_dict()` (defaults when None); `proposals` a
    `ProposalConfig.to_dict()` to make proposals in the same tasks; `label_names` a
    names file for every labelled scan whose manifest row names none. The report is also
    stored in the bank (reports/prepare-<time>.json); its path is `report["report_path"]`.
    """
    from tqdm import tqdm

    logger = get_run_logger()
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    cfg = PrepareConfig.from_dict(config or {})
    scans = collect_inputs(list(inputs), dataset, label_names, cfg.id_from)
    store = Bank.create(bank)  # also finishes/undoes writes a killed run left behind
    bank_path = str(Path(bank).expanduser().resolve())
    logger.info("preparing %d scans into %s", len(scans), bank_path)

    records: list[dict] = []
    with (
        shared_torch_threads(workers, dask_address, processes),
        make_task_runner(workers, dask_address, processes) as runner,
    ):
        futures = {
            runner.submit(
                prepare_one,
                {
                    "scan_id": s.scan_id,
                    "item": s.to_dict(),
                    "bank": bank_path,
                    "config": cfg.to_dict(),
                    "proposals": proposals,
                },
            ): s
            for s in scans
        }
        bar = tqdm(total=len(scans), desc="prepare", unit="scan", disable=not progress)
        with bar:
            for fut in as_completed(list(futures)):
                item = futures[fut]
                fut.wait()
                state = fut.state
                if state.is_completed():
                    rec = fut.result()
                else:
                    rec = _failed_from_exception(item, _exception_of(state))
                records.append(rec)
                bar.set_postfix(summarise_records(records), refresh=False)
                bar.update(1)

    store.rebuild_index()  # single writer, after every task has finished
    order = {s.scan_id: i for i, s in enumerate(scans)}
    records.sort(key=lambda r: order[r["scan_id"]])
    counts = summarise_records(records)
    report = {
        "flow": "prepare",
        "bank": bank_path,
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "config": cfg.to_dict(),
        "fingerprint": cfg.fingerprint(),
        "proposals_config": proposals,
        "workers": workers,
        "dask_address": dask_address,
        "label_names": label_names,
        "counts": counts,
        "scans": records,
    }
    if cfg.id_from == "hash":  # a shared report names no file or folder either
        report = redact_names(report, scans)
    report["report_path"] = store.write_report("prepare", report)
    logger.info("prepare done: %s; report %s", counts, report["report_path"])
    for r in records:  # INFO: the CLI prints its own table; served runs log at INFO
        if r["status"] == "failed":
            logger.info("failed %s (%s): %s", r["scan_id"], r.get("file"), r["reason"])
    return report
