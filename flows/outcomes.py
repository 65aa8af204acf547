"""What a flow did with each scan, and the run's report: plain data, no Prefect.

A `ScanOutcome` is one scan's row of a run report; `run_report` assembles the report.
They live apart from `flows.per_scan` (which imports Prefect to define its tasks) so a
command whose plan holds no work can report without loading Prefect or Dask.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

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


def count_statuses(outcomes: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for o in outcomes:
        counts[o["status"]] = counts.get(o["status"], 0) + 1
    return counts


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


# Fields of a report row that name files, folders or hosts (patient identifiers hide in paths).
PATH_FIELDS = (
    "image",
    "label",
    "file",
    "label_names",
    "label_names_path",
    "source_path",
    "worker",
)


def redact_names(report: dict[str, Any], scans: Iterable[Any]) -> dict[str, Any]:
    """The report without file, folder or host names (``--id-from hash``): ids stand for them.

    ``scans`` are the run's `ScanInput`s. Path and host fields are dropped; a path inside
    a reason becomes the scan's id.
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
