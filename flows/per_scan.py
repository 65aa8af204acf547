"""The per-scan task policy every flow shares: one Prefect task per scan, run on Dask.

Retries: only transient I/O (an OSError that is not a bad-input `ScanError`) is
retried; the bank is the cache (tasks skip work already stored), so Prefect's own
result caching is off. Scans run as threads of one LocalCluster by default (numpy,
scipy and zarr release the GIL in the heavy parts, and the threads share the flow's
Prefect API connection), as processes with ``processes=True``, or on an existing
cluster named by ``dask_address``. Every task returns a `ScanOutcome`; `run_per_scan`
submits them, shows a progress bar and returns the outcomes in the order given;
`run_scans` does that for a flow and stores the run's report in the bank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner

from maskbank.bank import Bank
from maskbank.pipeline.errors import ScanError

TASK_RETRIES = 2
RETRY_DELAYS_S = [1, 4]
STATUSES = ("ok", "skipped", "failed")


def this_worker() -> str:
    """``host:pid`` of the process a task ran in, for cluster debugging."""
    return f"{socket.gethostname()}:{os.getpid()}"


def seconds_since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


@dataclass(frozen=True)
class ScanOutcome(Mapping):
    """What one flow did with one scan: the row of the run report.

    ``status`` is ok, skipped or failed; ``details`` holds the flow's own facts (the
    source file, the proposal count, ...). It reads like its report row
    (``outcome["n_proposals"]``), which `to_json` returns.
    """

    scan_id: str
    status: str
    reason: str | None = None
    seconds: float | None = None
    worker: str = field(default_factory=this_worker)  # made where the task runs
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        head = {"scan_id": self.scan_id, "status": self.status, "reason": self.reason}
        return {**head, "seconds": self.seconds, "worker": self.worker, **self.details}

    def with_details(self, **details: Any) -> ScanOutcome:
        return replace(self, details={**self.details, **details})

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


def crashed(scan_id: str, exc: BaseException | None, **details: Any) -> ScanOutcome:
    """The outcome of a task that raised (after its retries): failed, with the exception."""
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else "task failed"
    if is_transient_io(exc):
        reason += f" (gave up after {TASK_RETRIES} retries)"
    return ScanOutcome(scan_id, "failed", reason, seconds=None, details=details)


def count_statuses(outcomes: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for o in outcomes:
        counts[o["status"]] = counts.get(o["status"], 0) + 1
    return counts


def is_transient_io(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and not isinstance(exc, ScanError)


def exception_of(state: Any) -> BaseException | None:
    """The exception a failed Prefect state holds, or None."""
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
    return is_transient_io(exception_of(state))


def per_scan_task(flow: str) -> Callable:
    """The Prefect task decorator of a flow's per-scan function (which takes ``scan_id``)."""
    return task(
        name=f"{flow}-scan",
        task_run_name=f"{flow}-{{scan_id}}",
        retries=TASK_RETRIES,
        retry_delay_seconds=RETRY_DELAYS_S,
        retry_condition_fn=retry_transient_io,
        cache_policy=NO_CACHE,  # the bank is the cache
        persist_result=False,
    )


@dataclass(frozen=True)
class Cluster:
    """Where the per-scan tasks run: an existing Dask cluster at ``dask_address``, else a
    LocalCluster of ``workers`` threads (or processes with ``processes``).

    Process workers need PREFECT_API_URL to point at a running server (docs/cluster.md).
    """

    workers: int = 2
    dask_address: str | None = None
    processes: bool = False

    @property
    def threads_per_task(self) -> int:
        return max(1, (os.cpu_count() or 1) // max(1, int(self.workers)))

    def task_runner(self) -> DaskTaskRunner:
        # The scheduler and workers of a local cluster log every connection at INFO.
        logging.getLogger("distributed").setLevel(logging.WARNING)
        if self.dask_address:
            return DaskTaskRunner(address=self.dask_address)
        workers = max(1, int(self.workers))
        if self.processes:
            kwargs = {
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "env": {"OMP_NUM_THREADS": str(self.threads_per_task)},
            }
        else:
            kwargs = {"n_workers": 1, "threads_per_worker": workers, "processes": False}
        kwargs.update(dashboard_address=None, silence_logs=logging.WARNING)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)

    @contextlib.contextmanager
    def shared_torch_threads(self) -> Iterator[None]:
        """While scans run as threads of this process, give each scan's torch kernels
        ``cpu_count // workers`` threads instead of every core each; the previous setting
        comes back afterwards (e.g. for pretraining in the same process)."""
        if self.dask_address or self.processes:  # other processes: OMP_NUM_THREADS, above
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads_per_task)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def run_per_scan(
    scan_task: Any,
    params: Mapping[str, dict],
    cluster: Cluster,
    desc: str,
    progress: bool = True,
    crash_details: Mapping[str, dict] | None = None,
) -> list[ScanOutcome]:
    """Run ``scan_task`` once per scan id of ``params`` (id -> the task's parameters) on
    ``cluster``; return the outcomes in the order of ``params``, whatever order they
    finished in. A task that raised becomes a failed outcome (with ``crash_details``)."""
    from tqdm import tqdm

    outcomes: dict[str, ScanOutcome] = {}
    with cluster.shared_torch_threads(), cluster.task_runner() as runner:
        futures = {runner.submit(scan_task, p): scan_id for scan_id, p in params.items()}
        with tqdm(total=len(futures), desc=desc, unit="scan", disable=not progress) as bar:
            for fut in as_completed(list(futures)):
                scan_id = futures[fut]
                fut.wait()
                if fut.state.is_completed():
                    outcome = fut.result()
                else:
                    details = (crash_details or {}).get(scan_id, {})
                    outcome = crashed(scan_id, exception_of(fut.state), **details)
                outcomes[scan_id] = outcome
                bar.set_postfix(count_statuses(outcomes.values()), refresh=False)
                bar.update(1)
    return [outcomes[scan_id] for scan_id in params]


@dataclass(frozen=True)
class RunClock:
    """When a flow run started (wall clock for the report, monotonic for its duration)."""

    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    t0: float = field(default_factory=time.perf_counter)


def run_report(
    flow: str,
    bank: str,
    clock: RunClock,
    settings: Mapping[str, Any],
    outcomes: Iterable[ScanOutcome],
) -> dict[str, Any]:
    """The report of one flow run: what ran with which settings, counts, one row a scan."""
    rows = [o.to_json() for o in outcomes]
    return {
        "flow": flow,
        "bank": bank,
        "started_at": clock.started.isoformat(timespec="seconds"),
        "seconds": seconds_since(clock.t0),
        **settings,
        "counts": count_statuses(rows),
        "scans": rows,
    }


def run_scans(
    flow: str,
    scan_task: Any,
    params: Mapping[str, dict],
    store: Bank,
    *,
    bank_path: str,
    cluster: Cluster,
    settings: Mapping[str, Any],
    clock: RunClock,
    progress: bool = True,
    crash_details: Mapping[str, dict] | None = None,
    redact: Callable[[dict], dict] | None = None,
) -> dict[str, Any]:
    """`run_per_scan`, then index the bank and store the run's report in it (``redact``
    first, when given); return the report, with its path as ``report["report_path"]``."""
    outcomes = run_per_scan(scan_task, params, cluster, flow, progress, crash_details)
    store.rebuild_index()  # single writer, after every task has finished
    report = run_report(flow, bank_path, clock, settings, outcomes)
    if redact is not None:
        report = redact(report)
    report["report_path"] = store.write_report(flow, report)
    return report
