"""Plain-text tables for the terminal (prepare and propose reports, bank summaries)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], right: set[int] = frozenset()
) -> str:
    """A fixed-width table; columns listed in `right` are right-aligned (numbers)."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def format_prepare_report(report: dict) -> str:
    """Per-scan table (status, seconds, reason) followed by the totals line."""
    rows = []
    for r in report["scans"]:
        detail = r.get("reason") or ""
        if r["status"] == "ok" and r.get("note") and r["note"] != "new":
            detail = f"redone: {r['note']}"
        if r["status"] == "failed" and r.get("file") and r["file"] != r.get("image"):
            detail = f"{r['file']}: {detail}"  # e.g. the label file, not the image, is bad
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        row = [r["scan_id"], r["status"], secs, detail]
        if report.get("proposals_config"):
            row.insert(3, "" if r.get("n_proposals") is None else str(r["n_proposals"]))
        rows.append(row)
    header = ["scan", "status", "s", "reason"]
    right = {2}
    if report.get("proposals_config"):
        header.insert(3, "proposals")
        right.add(3)
    lines = [
        table(header, rows, right=right),
        "",
        f"{counts_line(report)} -> {report['bank']}",
    ]
    if report.get("report_path"):
        lines.append(f"report: {report['report_path']}")
    return "\n".join(lines)


def format_propose_report(report: dict) -> str:
    """Per-scan table (status, proposals, bytes per proposal, seconds) and the totals line."""
    rows = [
        [
            r["scan_id"],
            r["status"],
            r.get("n_proposals"),
            r.get("bytes_per_proposal"),
            r.get("seconds"),
            r.get("reason") or "",
        ]
        for r in report["scans"]
    ]
    header = ["scan", "status", "proposals", "B/prop", "s", "note"]
    lines = [table(header, rows, right={2, 3, 4}), ""]
    unknown = report.get("unknown_scans") or []
    if unknown:  # an import source naming scans the bank does not hold (a typo, another bank)
        shown = ", ".join(unknown[:10]) + (
            f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""
        )
        lines.append(f"not in the bank, ignored: {shown}")
    lines.append(f"{counts_line(report)}; report: {report['report_path']}")
    return "\n".join(lines)


def print_run_report(report: dict, as_json: bool = False) -> int:
    """Print a prepare or propose run's report (its table, or JSON); the exit status of the
    command that ran it: 1 when any scan failed."""
    if as_json:
        print(json.dumps(report, indent=1))
    elif report.get("flow") == "prepare":
        print(format_prepare_report(report))
    else:  # proposals made or imported: the same table
        print(format_propose_report(report))
    return 1 if report["counts"].get("failed") else 0


def counts_line(report: dict) -> str:
    """``3 ok, 1 skipped, 0 failed in 12.5 s``: the totals of a flow's report."""
    c = report["counts"]
    return (
        f"{c.get('ok', 0)} ok, {c.get('skipped', 0)} skipped, {c.get('failed', 0)} failed "
        f"in {report['seconds']:.1f} s"
    )
