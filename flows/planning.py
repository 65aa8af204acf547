"""Plan a run before any task exists: which inputs are new, changed or already done.

The flow reads the bank's index once and sorts every input in plain code, so a re-run
over a finished bank submits no task at all and a grown folder makes only its new scans
into work. Change detection is the one git and make use: each scan records the size and
modification time (ns) of the files it was prepared from (``source_stat`` in its
attributes and index row); an input whose files still have that size and mtime, under the
same path and with the same settings, is done without reading it. Only where those differ
does a task read the file and compare its SHA-256 with the stored one (equal content: the
new size/mtime is recorded and the scan kept). ``rehash`` compares SHA-256 on every file:
a content change that keeps both size and mtime (a copy with ``cp -p``, a clock set back)
is caught only there. Scans prepared before sizes and mtimes were recorded are hashed once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskbank.flows.inputs import ScanInput, collect_inputs
from maskbank.flows.outcomes import RunClock, ScanOutcome, redact_names, run_report
from maskbank.pipeline.reader import itk_data_file

#: Plan categories, in the order the plan is printed.
NEW, CHANGED, DONE = "new", "changed", "done"

#: Rough cost model of one prepare, for batching (seconds): a fixed part and a part per
#: byte of compressed input (a 300 MB CT takes tens of seconds).
PREPARE_FIXED_S = 0.03
PREPARE_S_PER_BYTE = 5e-8


def file_stat(path: str | os.PathLike | None) -> dict[str, int] | None:
    """Size and mtime_ns of an input: of the file, of a header with its data file (.mhd,
    .nhdr; sizes summed, latest mtime) or of every file of a DICOM folder; None if absent."""
    if not path:
        return None
    p = Path(path)
    try:
        if p.is_dir():
            files = [e for e in os.scandir(p) if e.is_file()]
            stats = [e.stat() for e in files]
            return {
                "size": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
                "files": len(stats),
            }
        stats = [p.stat()]
        data = itk_data_file(p)
        if data is not None:
            stats.append(Path(data).stat())
    except (FileNotFoundError, NotADirectoryError, ValueError, OSError):
        return None
    return {"size": sum(s.st_size for s in stats), "mtime_ns": max(s.st_mtime_ns for s in stats)}


def source_stat(scan: ScanInput, keep_paths: bool = True) -> dict[str, Any]:
    """What a prepared scan records about its inputs: size and mtime of the image, label and
    names files, and a digest of the rest of its manifest row (label and names paths unless
    ``keep_paths`` is False, metadata), so a changed row is work even with unchanged files."""
    names = scan.label_names if scan.label else None
    rest = {
        "label": scan.label if keep_paths else bool(scan.label),
        "label_names": names if keep_paths else bool(names),
        "metadata": scan.metadata or {},
    }
    digest = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "image": file_stat(scan.image),
        "label": file_stat(scan.label),
        "label_names": file_stat(names),
        "row": digest,
    }


@dataclass
class PlanItem:
    """One input and what the plan made of it (``reason`` says why it is work)."""

    scan: ScanInput
    category: str
    reason: str | None = None
    stat: dict[str, Any] | None = None
    check_content: bool = False  # work only if its SHA-256 differs from the stored one

    @property
    def cost_s(self) -> float:
        size = ((self.stat or {}).get("image") or {}).get("size", 0)
        return PREPARE_FIXED_S + PREPARE_S_PER_BYTE * size


@dataclass
class Plan:
    """Every input sorted into new, changed or done, in input order."""

    items: list[PlanItem] = field(default_factory=list)

    def of(self, category: str) -> list[PlanItem]:
        return [i for i in self.items if i.category == category]

    @property
    def work(self) -> list[PlanItem]:
        return [i for i in self.items if i.category != DONE]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys((NEW, CHANGED, DONE), 0)
        for i in self.items:
            out[i.category] += 1
        return out

    def reasons(self) -> dict[str, int]:
        """How many changed inputs there are per reason."""
        out: dict[str, int] = {}
        for i in self.of(CHANGED):
            out[i.reason or ""] = out.get(i.reason or "", 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_json(self, limit: int | None = None) -> dict[str, Any]:
        """The plan as a report: counts, reasons, and the work (first ``limit`` of each)."""
        out: dict[str, Any] = {"counts": self.counts(), "changed_reasons": self.reasons()}
        for cat in (NEW, CHANGED):
            rows = [
                {"scan_id": i.scan.scan_id, "image": i.scan.image, "reason": i.reason}
                for i in self.of(cat)
            ]
            out[cat] = rows if limit is None else rows[:limit]
        return out


def plan_prepare(
    scans: Iterable[ScanInput],
    rows: Mapping[str, Mapping[str, Any]],
    fingerprint: str,
    *,
    rehash: bool = False,
    keep_paths: bool = True,
) -> Plan:
    """Sort ``scans`` against the bank's index ``rows`` (scan id -> row) in plain code.

    New: no row. Changed: another config or dataset, files whose size or mtime differ
    from the recorded ones (a task compares SHA-256 first: ``check_content``), no record
    of them (a scan prepared before they were recorded), another path under this id,
    or ``rehash``. Done: everything matches; no file is read.
    """
    plan = Plan()
    for scan in scans:
        stat = source_stat(scan, keep_paths)
        row = rows.get(scan.scan_id)
        item = PlanItem(scan, NEW, "new", stat)
        if row is not None:
            item.category, item.reason = CHANGED, None
            dataset = scan.dataset or "default"
            old_path = row.get("source_path")
            if row.get("fingerprint") != fingerprint:
                item.reason = "config changed"
            elif (row.get("dataset") or "default") != dataset:
                item.reason = "dataset changed"
            elif keep_paths and old_path and old_path != str(Path(scan.image).resolve()):
                item.reason, item.check_content = "another source path under this id", True
            elif rehash:
                item.reason, item.check_content = "--rehash", True
            elif not row.get("source_stat"):
                item.reason, item.check_content = "no size/mtime recorded", True
            elif stat["image"] is None:
                item.reason = "source missing"  # the task reports it
            else:
                why = stat_difference(row["source_stat"], stat)
                if why is None:
                    item.category = DONE
                else:
                    item.reason, item.check_content = why, True
        plan.items.append(item)
    return plan


def stat_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """None when the recorded stat matches; else which input differs."""
    for key, what in (
        ("image", "source"),
        ("label", "label"),
        ("label_names", "label names"),
        ("row", "manifest row"),
    ):
        if old.get(key) != new.get(key):
            return f"{what} changed (size/mtime)" if key != "row" else f"{what} changed"
    return None


#: The reason of a scan the bank already holds from the same source with the same settings.
SKIPPED = "already in the bank (same source, config)"


def planned_skip(scan: ScanInput, **details: Any) -> ScanOutcome:
    """The report row of a scan the plan found done: no task ran, no file was read."""
    reason = f"{SKIPPED}; size/mtime unchanged"
    details = {"image": scan.image, "label": scan.label, **details}
    return ScanOutcome(scan.scan_id, "skipped", reason, 0.0, details=details)


@dataclass
class PrepareRun:
    """A prepare run, planned: its inputs collected (``scans``), the bank's index
    ``rows`` it was planned against, the `Plan`, and with ``proposals`` (a
    ``ProposalConfig.to_dict()``) the done scans whose proposals are up to date too
    (``done_proposals``: id -> count). ``key`` names the run (`plan_prepare_run`)."""

    key: str
    bank: str
    scans: list[ScanInput]
    rows: Mapping[str, Mapping[str, Any]]
    plan: Plan
    proposals: dict[str, Any] | None = None
    id_from: str = "name"
    done_proposals: dict[str, int] = field(default_factory=dict)

    def settles(self, item: PlanItem) -> bool:
        """Whether the plan settles ``item`` without a task: done, and its proposals too."""
        return item.category == DONE and (
            self.proposals is None or item.scan.scan_id in self.done_proposals
        )

    @property
    def work(self) -> list[PlanItem]:
        """The inputs a task must see: new, changed, or done with proposals to make."""
        return [i for i in self.plan.items if not self.settles(i)]

    def settled(self) -> list[ScanOutcome]:
        """The report rows of the inputs settled by the plan, in input order."""
        rows = []
        for item in self.plan.items:
            if self.settles(item):
                details: dict[str, Any] = {}
                if self.proposals is not None:
                    details = {
                        "n_proposals": self.done_proposals[item.scan.scan_id],
                        "proposals": "skipped",
                    }
                rows.append(planned_skip(item.scan, **details))
        return rows

    def settings(
        self,
        config: Mapping[str, Any],
        fingerprint: str,
        workers: int,
        dask_address: str | None,
        label_names: str | None,
    ) -> dict[str, Any]:
        """The run report's settings (``config``: the `PrepareConfig`'s dict form)."""
        return {
            "config": dict(config),
            "fingerprint": fingerprint,
            "proposals_config": self.proposals,
            "workers": workers,
            "dask_address": dask_address,
            "label_names": label_names,
            "plan": self.plan.counts(),
        }

    def redact(self, report: dict[str, Any]) -> dict[str, Any]:
        """``report`` as stored and printed: without file and host names with hashed ids."""
        return redact_names(report, self.scans) if self.id_from == "hash" else report


def _run_key(**parts: Any) -> str:
    # JSON: a flow's parameters may come back validated (lists for tuples) and still match
    return json.dumps(parts, sort_keys=True, default=str)


def plan_prepare_run(
    store: Any,
    bank: str,
    inputs: list[str],
    config: Any,
    dataset: str | None = None,
    label_names: str | None = None,
    *,
    rehash: bool = False,
    proposals: Mapping[str, Any] | None = None,
    scans: list[ScanInput] | None = None,
) -> PrepareRun:
    """Plan a prepare run in plain code (no Prefect, no Dask, no file read but its size and
    mtime): collect ``inputs`` (unless ``scans`` holds them collected already), sort them
    against ``store``'s index (None: no bank yet, everything is new) with ``config`` (a
    `PrepareConfig`), and with ``proposals`` check the done scans' proposals
    (`proposals_up_to_date`). A run `hand_over` left for this very run is taken instead
    of collecting and planning again."""
    fingerprint = config.fingerprint()
    key = _run_key(
        bank=bank,
        inputs=[os.fspath(i) for i in inputs],
        dataset=dataset,
        label_names=label_names,
        fingerprint=fingerprint,
        id_from=config.id_from,
        rehash=rehash,
        proposals=proposals,
    )
    handed = _take_handed(PrepareRun)
    if handed is not None and handed.key == key:
        return handed
    if scans is None:
        scans = collect_inputs(list(inputs), dataset, label_names, config.id_from)
    rows = store.index_rows if store is not None else {}
    plan = plan_prepare(
        scans, rows, fingerprint, rehash=rehash, keep_paths=config.id_from != "hash"
    )
    run = PrepareRun(key, bank, scans, rows, plan, _plain(proposals), config.id_from)
    if proposals is not None and store is not None and plan.of(DONE):
        from maskbank.pipeline.proposals.config import ProposalConfig  # import-light

        done = [i.scan.scan_id for i in plan.of(DONE)]
        proposal_fp = ProposalConfig.from_dict(dict(proposals)).fingerprint()
        run.done_proposals = proposals_up_to_date(store, done, proposal_fp)
    return run


def _plain(proposals: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return dict(proposals) if proposals is not None else None


def settled_prepare_report(
    store: Any, run: PrepareRun, settings: Mapping[str, Any], clock: RunClock
) -> dict[str, Any]:
    """The prepare report of a run with no work, stored in the bank like a flow run's:
    every input skipped as done, no task, no Prefect (``clock``: when the run began)."""
    report = run.redact(run_report("prepare", run.bank, clock, settings, run.settled()))
    report["report_path"] = store.write_report("prepare", report)
    report["label_name_conflicts"] = []  # a run that wrote no label adds no disagreement
    return report


def scan_version(scan: Any) -> str:
    """What proposals derive from: source hash, prepare fingerprint, write time and token."""
    a = scan.attrs
    bits = [a.get("source_sha256"), a.get("fingerprint"), scan.info.get("written_at")]
    if scan.info.get("token"):
        bits.append(scan.info["token"])
    return "|".join(str(x) for x in bits)


#: Scans whose proposal sets are checked at once when planning (threads of the driver).
CHECK_THREADS = 8


def proposals_up_to_date(
    store: Any, scan_ids: Iterable[str], fingerprint: str, name: str = "default"
) -> dict[str, int]:
    """Scan id -> proposal count, for the scans whose set ``name`` was made with the config
    ``fingerprint`` from the scan as it is stored now; the others are work.

    Reads two small attribute documents per scan (the scan's and the set's), in
    `CHECK_THREADS` threads, and nothing of a scan the index lists without that set.
    """
    from concurrent.futures import ThreadPoolExecutor

    rows = store.index_rows
    candidates = []
    for s in scan_ids:
        sets = (rows.get(s) or {}).get("proposal_sets")
        if sets is None or name in sets:  # None: a row from before named sets
            candidates.append(s)

    def check(scan_id: str) -> tuple[str, int | None]:
        try:
            scan = store.scan(scan_id)
            old = scan.proposal_set_attrs(name)
        except Exception:  # unreadable: the task says why
            return scan_id, None
        if (
            old
            and old.get("fingerprint") == fingerprint
            and old.get("scan_version") == (scan_version(scan))
        ):
            return scan_id, int(old.get("n_proposals", 0))
        return scan_id, None

    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        found = dict(pool.map(check, candidates))
    return {s: n for s, n in found.items() if n is not None}


#: The reason of a scan whose proposals the plan found done.
UP_TO_DATE = "proposals up to date (same config and scan)"


@dataclass
class ProposalPlan:
    """Which scans of a bank need proposal set ``name`` made with the config
    ``fingerprint`` (``work``) and which hold it already (``done``: id -> count)."""

    bank: str
    scan_ids: list[str]
    fingerprint: str
    name: str
    force: bool
    done: dict[str, int]

    @property
    def work(self) -> list[str]:
        return [s for s in self.scan_ids if s not in self.done]

    def counts(self) -> dict[str, int]:
        return {"work": len(self.scan_ids) - len(self.done), "done": len(self.done)}

    def settings(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The run report's settings (``config``: the proposal config's dict form)."""
        return {
            "config": dict(config),
            "fingerprint": self.fingerprint,
            "name": self.name,
            "plan": self.counts(),
        }

    def settled(self) -> list[ScanOutcome]:
        """The report rows of the scans found done: no task ran for them."""
        return [
            ScanOutcome(s, "skipped", UP_TO_DATE, 0.0, details={"n_proposals": n})
            for s, n in self.done.items()
        ]


def plan_proposals(
    store: Any,
    bank: str,
    scan_ids: Iterable[str],
    fingerprint: str,
    name: str = "default",
    force: bool = False,
) -> ProposalPlan:
    """The proposals plan of ``scan_ids`` (``force``: every scan is work), in plain code:
    no Prefect, no Dask, no proposal engine (`proposals_up_to_date` reads attributes only).
    A plan `hand_over` left for this very run is taken instead of planning again."""
    ids = list(scan_ids)
    handed = _take_handed(ProposalPlan)
    key = (bank, ids, fingerprint, name, force)
    if (
        handed is not None
        and (
            handed.bank,
            handed.scan_ids,
            handed.fingerprint,
            handed.name,
            handed.force,
        )
        == key
    ):
        return handed
    done = {} if force else proposals_up_to_date(store, ids, fingerprint, name)
    return ProposalPlan(bank, ids, fingerprint, name, force, done)


#: Plans the CLI made before starting its flow in the same process, by plan type, each
#: with the bank it was planned against (see `hand_over`).
_HANDED: dict[str, tuple[Any, Any]] = {}


@contextlib.contextmanager
def hand_over(plan: ProposalPlan | PrepareRun, store: Any = None) -> Iterator[None]:
    """Within the block, the next `plan_proposals` (`plan_prepare_run`) of the same run
    takes ``plan`` instead of planning again (a command plans first to exit early when
    there is no work; a large bank is then planned once, not twice), and `handed_bank`
    gives the flow ``store``, the bank the command opened (and recovered) to plan, so
    that the flow does not open and parse the index a second time. Taken once; dropped
    at the block's end."""
    kind = type(plan).__name__
    _HANDED[kind] = (plan, store)
    try:
        yield
    finally:
        _HANDED.pop(kind, None)


def handed_bank(kind: type, bank: str) -> Any:
    """The bank handed over with a plan of type ``kind`` for the bank at ``bank``
    (resolved location), or None: the flow then opens the bank itself."""
    plan, store = _HANDED.get(kind.__name__, (None, None))
    if plan is None or plan.bank != bank or not getattr(store, "writable", False):
        return None
    return store


def _take_handed(kind: type) -> Any:
    plan, _store = _HANDED.pop(kind.__name__, (None, None))
    return plan


def settled_report(
    store: Any, plan: ProposalPlan, config: Mapping[str, Any], clock: RunClock
) -> dict[str, Any]:
    """The propose report of a plan with no work, stored in the bank like a flow run's:
    every scan skipped as up to date, no task, no Prefect (``clock``: when the run began)."""
    rows = plan.settled()
    by_id = {o.scan_id: o for o in rows}
    report = run_report(
        "propose", plan.bank, clock, plan.settings(config), [by_id[s] for s in plan.scan_ids]
    )
    report["report_path"] = store.write_report("propose", report)
    return report


#: Rough cost model of one scan's proposals, for batching (seconds per voxel of the
#: prepared image, and a fixed part).
PROPOSE_FIXED_S = 0.2
PROPOSE_S_PER_VOXEL = 2e-5


def propose_cost_s(row: Mapping[str, Any] | None) -> float:
    shape = (row or {}).get("shape") or (64, 64, 64)
    voxels = 1
    for n in shape:
        voxels *= int(n)
    return PROPOSE_FIXED_S + PROPOSE_S_PER_VOXEL * voxels
