"""The per-scan policy every flow shares: per-scan work in batches of Prefect tasks on Dask.

A flow plans first (`flows.planning`: what is new, changed or done) and submits only the
work, grouped into batches of tens of seconds each (`make_batches`), a bounded number
in flight. Inside a batch every scan keeps the policy of a task of its own
(`run_one`): its own outcome and report row, only transient I/O (an OSError that is not
a bad-input `ScanError`) retried, and any failure its own; a batch whose task died is
run again one scan per task. The bank is the cache, so Prefect's own result caching is
off. Scans run as threads of one LocalCluster by default (numpy, scipy and zarr release
the GIL in the heavy parts, and the threads share the flow's Prefect API connection), as
processes with ``processes=True``, or on an existing cluster named by ``dask_address``.
Every scan's work returns a `ScanOutcome`; `run_per_scan` runs them, shows a progress
bar and returns the outcomes in the order given; `run_scans` does that for a flow and
stores the run's report in the bank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from maskbank.bank import Bank
from maskbank.flows.outcomes import (  # noqa: F401 (re-exported: the flows import them here)
    STATUSES,
    RunClock,
    ScanOutcome,
    count_statuses,
    run_report,
    seconds_since,
    this_worker,
)
from maskbank.pipeline.errors import ScanError

TASK_RETRIES = 2
RETRY_DELAYS_S = [1, 4]


def crashed(scan_id: str, exc: BaseException | None, **details: Any) -> ScanOutcome:
    """The outcome of a task that raised (after its retries): failed, with the exception."""
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else "task failed"
    if is_transient_io(exc):
        reason += f" (gave up after {TASK_RETRIES} retries)"
    return ScanOutcome(scan_id, "failed", reason, seconds=None, details=details)


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

    def task_runner(self) -> Any:
        """A DaskTaskRunner (imported here: a run with no work never loads Dask)."""
        from prefect_dask import DaskTaskRunner

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

    def parallelism(self) -> int:
        """Scans run at once: ``workers``, or on an existing cluster the threads its
        workers have now if that is more (an adaptive cluster that has not grown yet
        has fewer; ``workers`` then names its largest size)."""
        workers = max(1, int(self.workers))
        if not self.dask_address:
            return workers
        from distributed import Client

        try:
            with Client(self.dask_address, timeout="30s") as client:
                threads = sum(client.nthreads().values())
        except OSError as exc:
            raise OSError(f"no Dask scheduler answers at {self.dask_address}: {exc}") from exc
        return max(workers, threads)

    @contextlib.contextmanager
    def shared_torch_threads(self) -> Iterator[None]:
        """While scans run as threads of this process, give each scan's torch kernels
        ``cpu_count // workers`` threads instead of every core each; the previous setting
        comes back afterwards (e.g. for pretraining in the same process)."""
        if self.dask_address or self.processes:  # other processes: OMP_NUM_THREADS, above
            yield
            return
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads_per_task)
        try:
            yield
        finally:
            torch.set_num_threads(before)


#: Batches aim at this many seconds of work each (tens of seconds: the scheduler's and
#: Prefect's cost per task stays small next to it, and the Prefect database grows by one
#: task run per batch); ``batch`` overrides it with a fixed number of scans.
BATCH_TARGET_S = 20.0
#: ... but a run has at least this many batches per worker, so the last ones balance ...
BATCHES_PER_WORKER = 4
#: ... and no batch is cut below this many seconds (a few scans of a grown folder are one
#: task, not one task each: Prefect and Dask cost ~0.1 s per task).
MIN_BATCH_S = 2.0
#: Batches submitted and not yet finished, per worker: the driver's memory stays flat.
IN_FLIGHT_PER_WORKER = 2


def make_batches(costs: Sequence[float], workers: int, batch: int | None = None) -> list[list[int]]:
    """Positions ``0..len(costs)-1`` grouped into consecutive batches.

    ``batch``: that many scans each. Else by estimated cost (seconds per scan): about
    `BATCH_TARGET_S` each, smaller where that would leave fewer than `BATCHES_PER_WORKER`
    batches per worker, never below `MIN_BATCH_S`.
    """
    n = len(costs)
    if n == 0:
        return []
    if batch:
        return [list(range(i, min(n, i + batch))) for i in range(0, n, batch)]
    total = float(sum(costs))
    target = min(BATCH_TARGET_S, total / (BATCHES_PER_WORKER * max(1, workers)))
    target = max(target, MIN_BATCH_S)
    out: list[list[int]] = [[]]
    spent = 0.0
    for i, cost in enumerate(costs):
        if out[-1] and spent + cost > target * 1.0001:
            out.append([])
            spent = 0.0
        out[-1].append(i)
        spent += cost
    return out


_batch_state = threading.local()


def open_bank(location: str) -> Bank:
    """The bank at ``location`` opened for writing once per batch (and thread): a batch's
    scans share one open, so the index is read once per batch, not once per scan."""
    banks = getattr(_batch_state, "banks", None)
    if banks is None:
        return Bank.open(location, mode="a")
    if location not in banks:
        banks[location] = Bank.open(location, mode="a")
    return banks[location]


def run_one(fn: Callable[..., ScanOutcome], item: Mapping[str, Any]) -> ScanOutcome:
    """One scan of a batch, with the retry policy of a task of its own: a transient OSError
    is retried (`TASK_RETRIES`, after `RETRY_DELAYS_S`); anything else it raises fails this
    scan alone (with ``item["crash"]`` details), never its batch-mates."""
    params = item["params"]
    for attempt in range(TASK_RETRIES + 1):
        try:
            return fn(**params)
        except Exception as exc:
            if is_transient_io(exc) and attempt < TASK_RETRIES:
                time.sleep(RETRY_DELAYS_S[attempt])
                continue
            return crashed(params["scan_id"], exc, **(item.get("crash") or {}))
    raise AssertionError("unreachable")


@task(
    name="scan-batch",
    task_run_name="{flow}-{first}+{size}",
    cache_policy=NO_CACHE,  # the bank is the cache
    persist_result=False,
)
def run_batch(
    flow: str, fn: Callable[..., ScanOutcome], items: list[dict], first: str, size: int
) -> list[ScanOutcome]:
    """One Dask task: the scans of a batch one after the other, each with its own outcome."""
    return run_items(getattr(fn, "fn", fn), items)  # a `per_scan_task`: its function


def run_items(fn: Callable[..., ScanOutcome], items: list[dict]) -> list[ScanOutcome]:
    """The body of `run_batch` (a module function, so the task pickles by reference)."""
    _batch_state.banks = {}
    try:
        return [run_one(fn, item) for item in items]
    finally:
        _batch_state.banks = None


def run_per_scan(
    scan_task: Any,
    params: Mapping[str, dict],
    cluster: Cluster,
    desc: str,
    progress: bool = True,
    crash_details: Mapping[str, dict] | None = None,
    costs: Mapping[str, float] | None = None,
    batch: int | None = None,
) -> list[ScanOutcome]:
    """Run ``scan_task`` (a per-scan function, or a task made by `per_scan_task`) once per
    scan id of ``params`` (id -> its parameters) on ``cluster``, in batches (`make_batches`
    from ``costs``, id -> estimated seconds, or ``batch`` scans each) of which at most
    `IN_FLIGHT_PER_WORKER` per worker are submitted at a time; return the outcomes in the
    order of ``params``. A scan that raised fails alone (with ``crash_details``); a batch
    whose task died (a killed worker) is run again one scan per task, so that a scan that
    kills its worker fails alone too.
    """
    from tqdm import tqdm

    ids = list(params)
    per_scan = [(costs or {}).get(s, 1.0) for s in ids]
    workers = cluster.parallelism() if ids else 1
    pending = deque(
        [
            [{"params": params[ids[i]], "crash": (crash_details or {}).get(ids[i], {})} for i in b]
            for b in make_batches(per_scan, workers, batch)
        ]
    )
    limit = max(2, IN_FLIGHT_PER_WORKER * workers)
    outcomes: dict[str, ScanOutcome] = {}
    done: queue.SimpleQueue = queue.SimpleQueue()
    if not ids:
        return []
    with (
        cluster.shared_torch_threads(),
        cluster.task_runner() as runner,
        tqdm(total=len(ids), desc=desc, unit="scan", disable=not progress) as bar,
    ):
        in_flight: dict[Any, list[dict]] = {}
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                items = pending.popleft()
                first = items[0]["params"]["scan_id"]
                fut = runner.submit(
                    run_batch,
                    {
                        "flow": desc,
                        "fn": scan_task,
                        "items": items,
                        "first": first,
                        "size": len(items),
                    },
                )
                in_flight[fut] = items
                fut.add_done_callback(done.put)
            fut = done.get()
            items = in_flight.pop(fut)
            fut.wait()
            if fut.state.is_completed():
                finished = list(fut.result())
            elif len(items) > 1:  # the task itself died: each scan again, alone
                pending.extendleft([item] for item in reversed(items))
                continue
            else:
                item = items[0]
                exc = exception_of(fut.state)
                finished = [crashed(item["params"]["scan_id"], exc, **item["crash"])]
            for outcome in finished:
                outcomes[outcome.scan_id] = outcome
            bar.set_postfix(count_statuses(outcomes.values()), refresh=False)
            bar.update(len(finished))
    return [outcomes[scan_id] for scan_id in ids]


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
    costs: Mapping[str, float] | None = None,
    batch: int | None = None,
    planned: Iterable[ScanOutcome] = (),
    order: Iterable[str] | None = None,
) -> dict[str, Any]:
    """`run_per_scan` on the work ``params``, then index the bank and store the run's
    report in it (``redact`` first, when given); return the report, with its path as
    ``report["report_path"]``. ``planned`` are the outcomes the plan settled without a
    task (scans already done); the report lists every scan in ``order`` (default: the
    work, then the planned ones)."""
    outcomes = run_per_scan(scan_task, params, cluster, flow, progress, crash_details, costs, batch)
    if params:
        # after every task has finished: finish what a killed task left behind and bring
        # the index up to date where it lags (a listing and one index read, not a rebuild
        # from every scan group: a grown folder's run stays short in a large bank)
        store.recover()
    by_id = {o.scan_id: o for o in planned}
    by_id.update((o.scan_id, o) for o in outcomes)
    ordered = [by_id[s] for s in order] if order is not None else list(by_id.values())
    report = run_report(flow, bank_path, clock, settings, ordered)
    if redact is not None:
        report = redact(report)
    report["report_path"] = store.write_report(flow, report)
    return report
