"""The `import_masks` Prefect flow: existing masks (e.g. TotalSegmentator output) as a named
proposal set of every scan that has them, one Dask task per scan.

Each task maps the scan's mask files from the source scan's grid onto the bank grid
(`pipeline.mask_import`), computes the proposal features and writes the set like
`maskbank propose` does; a scan whose masks fail (wrong grid, unreadable) fails alone.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger

from maskbank.bank import Bank
from maskbank.bank.writing import resolve_location, write_proposals
from maskbank.flows.per_scan import (
    Cluster,
    RunClock,
    ScanOutcome,
    open_bank,
    per_scan_task,
    run_scans,
    seconds_since,
)
from maskbank.flows.propose import raw_image
from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.mask_import import MASK_SUFFIXES, imported_set, mask_files
from maskbank.pipeline.proposals.features import compute_features


def _manifest_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a .csv (header scan_id,path; a spreadsheet's BOM and spaces
    around names and values are fine) or .jsonl manifest (one object per line)."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {n} is not a JSON object: {line.strip()[:80]}")
            rows.append((n, row))
        return rows
    reader = csv.DictReader(text.splitlines(), skipinitialspace=True)
    return [
        (reader.line_num, {str(k).strip(): (v or "").strip() for k, v in row.items() if k})
        for row in reader
    ]


def mask_sources(source: str | Path) -> dict[str, str]:
    """Scan id -> mask file or folder, from a folder or a .csv/.jsonl manifest.

    A folder holds ``<scan_id>/`` (mask files inside) or ``<scan_id>.nii.gz`` (one
    file) per scan; a manifest has columns ``scan_id,path`` (relative paths are taken
    from the manifest's folder), one row per scan: a scan with several mask files
    points at the folder holding them. Paths come back absolute (they are recorded in
    the bank and may be read by workers started elsewhere).
    """
    src = Path(source).absolute()
    if src.is_file() and src.suffix.lower() in (".csv", ".jsonl"):
        out: dict[str, str] = {}
        first: dict[str, int] = {}
        for line, row in _manifest_rows(src):
            scan_id, path = str(row.get("scan_id") or "").strip(), str(row.get("path") or "")
            if not scan_id or not path.strip():
                raise ValueError(f"{src}: line {line}: every row needs scan_id and path, got {row}")
            if scan_id in out:
                raise ValueError(
                    f"{src}: scan {scan_id!r} on lines {first[scan_id]} and {line}; give one "
                    "row per scan (a folder holding all its mask files when there are several)"
                )
            first[scan_id] = line
            out[scan_id] = str(src.parent / Path(path.strip()).expanduser())
        return out
    if not src.is_dir():
        raise ValueError(f"{src}: not a folder or a .csv/.jsonl manifest")
    out = {}
    for entry in sorted(src.iterdir()):
        if entry.is_dir():
            out[entry.name] = str(entry)
            continue
        for suffix in MASK_SUFFIXES:
            if entry.name.lower().endswith(suffix):
                out[entry.name[: -len(suffix)]] = str(entry)
                break
    return out


def import_scan(store: Bank, scan_id: str, path: str | None, name: str) -> ScanOutcome:
    """Store the masks at ``path`` as scan ``scan_id``'s proposal set ``name``."""
    t0 = time.perf_counter()
    if path is None:
        return ScanOutcome(scan_id, "skipped", "no masks for this scan", seconds=0.0)
    scan = store.scan(scan_id)
    try:
        files = mask_files(path)
        ps = imported_set(files, scan.attrs, source=name)
    except ScanError as exc:
        return ScanOutcome(scan_id, "failed", str(exc), seconds=seconds_since(t0))
    body = np.asarray(scan.read("body"), dtype=bool) if scan.has("body") else None
    ps = compute_features(ps, raw_image(scan), body, scan.spacing)
    attrs = {"imported_from": str(path), "files": [f.name for f in files]}
    write_proposals(store, scan_id, ps, attrs, scan_token=scan.token, name=name)
    details = {"n_proposals": ps.count, "files": len(files)}
    return ScanOutcome(scan_id, "ok", details=details, seconds=seconds_since(t0))


@per_scan_task("import")
def import_one(scan_id: str, bank: str, path: str | None, name: str) -> ScanOutcome:
    """One Dask task: one scan's imported masks."""
    return import_scan(open_bank(bank), scan_id, path, name)  # one open per batch


@flow(name="import-masks", validate_parameters=True)
def import_masks(
    bank: str,
    source: str,
    name: str,
    scan_ids: list[str] | None = None,
    workers: int = 2,
    dask_address: str | None = None,
    processes: bool = False,
    progress: bool = True,
) -> dict:
    """Import the masks at ``source`` as proposal set ``name``; return (and store) the report."""
    logger = get_run_logger()
    clock = RunClock()
    store = Bank.open(bank, mode="a")
    ids = list(scan_ids) if scan_ids else store.scan_ids
    sources = mask_sources(source)
    bank_path = resolve_location(bank)
    params = {
        s: {"scan_id": s, "bank": bank_path, "path": sources.get(s), "name": name} for s in ids
    }
    report = run_scans(
        "import",
        import_one,
        params,
        store,
        bank_path=bank_path,
        cluster=Cluster(workers, dask_address, processes),
        settings={"source": str(source), "name": name},
        clock=clock,
        progress=progress,
    )
    unknown = sorted(set(sources) - set(store.scan_ids))
    if unknown:
        report["unknown_scans"] = unknown
    logger.info("import done: %s", report["counts"])
    return report
