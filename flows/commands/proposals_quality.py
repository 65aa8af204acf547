"""`maskbank proposals-quality`: how well a bank's proposals cover its labelled structures."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from maskbank.flows.proposals_quality import SORTS, bank_quality, sort_rows

__all__ = ["add_parser", "bank_quality", "format_table", "run", "sort_rows"]

DESCRIPTION = """\
For every scan with an evaluation label map and proposals, and every labelled structure
(each label value; lesion-like values split into connected components) of at least
--min-voxels voxels, the best Dice over all proposals of that scan.  Prints per-scan and
overall average best Dice (ABO), recall at each --levels Dice level, proposals per scan
and bytes per proposal, then one row per structure (sorted by --sort), so it shows at
which sizes coverage fails.  --baseline slic[:N] runs skimage SLIC with N segments
(default 2000) on the same stored image, grid and body mask and reports it beside ours.
"""

EPILOG = """\
examples:
  maskbank proposals-quality bank/
  maskbank proposals-quality bank/ --baseline slic --min-voxels 27 --sort size
  maskbank proposals-quality bank/ --baseline slic:5000 --levels 0.5,0.8 --csv per-structure.csv
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from maskbank.flows.commands.options import add_scan_selection

    p = subparsers.add_parser(
        "proposals-quality",
        help="best-Dice coverage of labelled structures by the proposals (ABO, recall)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bank", metavar="BANK", help="bank folder or URL")
    add_scan_selection(p)
    p.add_argument(
        "--baseline",
        default=None,
        metavar="slic[:N]",
        help="also score single-scale SLIC with N segments (default 2000) on the same grid",
    )
    p.add_argument(
        "--min-voxels",
        type=int,
        default=1,
        help="score only structures of at least this many voxels (default: 1)",
    )
    p.add_argument(
        "--levels",
        default="0.5,0.7,0.9",
        help="Dice levels to report recall at, comma list (default: 0.5,0.7,0.9)",
    )
    p.add_argument(
        "--sort",
        choices=SORTS,
        default="size",
        help="order of the per-structure rows: size (smallest first), abo (worst first), name",
    )
    p.add_argument("--csv", default=None, metavar="PATH", help="write per-structure rows as CSV")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _levels(text: str) -> tuple[float, ...]:
    try:
        levels = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise ValueError(f"--levels {text!r}: expected numbers such as 0.5,0.7") from None
    if not levels or not all(0 < v <= 1 for v in levels):
        raise ValueError(f"--levels {text!r}: Dice levels must lie in (0, 1]")
    return levels


def _recall_keys(q: dict) -> list[str]:
    return sorted(k for k in q if k.startswith("recall_"))


def format_table(q: dict, sort: str = "size") -> str:
    keys = ["abo", *_recall_keys(q)]
    has_base = "baseline" in q
    titles = ["ABO" if k == "abo" else k.replace("recall_", "R@.") for k in keys]
    sw = max([32, *(len(s["scan_id"]) for s in q["scans"])])  # long ids keep columns aligned
    head = f"{'scan':<{sw}} " + " ".join(f"{t:>7}" for t in titles)
    lines = [head + f" {'props':>7} {'B/prop':>8}"]

    def vals(d: dict) -> str:
        return " ".join(f"{d.get(k, float('nan')):>7.3f}" for k in keys)

    for s in q["scans"]:
        lines.append(
            f"{s['scan_id']:<{sw}} {vals(s)} {s['proposals']:>7} {s['bytes_per_proposal']:>8.1f}"
        )
        if "baseline" in s:
            b = s["baseline"]
            lines.append(f"{'  ' + q['baseline']['method']:<{sw}} {vals(b)} {b['proposals']:>7}")
    per_scan, per_prop = q["proposals_per_scan"], q["bytes_per_proposal"]
    lines.append(f"{'overall':<{sw}} {vals(q)} {per_scan:>7.0f} {per_prop:>8.1f}")
    if has_base:
        lines.append(f"{'  ' + q['baseline']['method']:<{sw}} {vals(q['baseline'])}")
    if q["rows"]:
        lines.append("")
        extra = f" {'baseline':>9}" if has_base else ""
        # As wide as the longest id: a cut id cannot be told from another or looked up.
        w = max([len("scan"), *(len(r["scan_id"]) for r in q["rows"])])
        lines.append(f"{'scan':<{w}} {'structure':<36} {'voxels':>8} {'best Dice':>9}{extra}")
        for r in sort_rows(q["rows"], sort):
            b = f" {r['baseline_dice']:>9.3f}" if "baseline_dice" in r else ""
            lines.append(
                f"{r['scan_id']:<{w}} {r['structure'][:36]:<36} {r['voxels']:>8} "
                f"{r['best_dice']:>9.3f}{b}"
            )
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
    cols = ["scan_id", "structure", "voxels", "best_dice"]
    if rows and "baseline_dice" in rows[0]:
        cols.append("baseline_dice")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def run(args: argparse.Namespace) -> int:
    from maskbank.flows.commands.options import open_bank_scans
    from maskbank.pipeline.proposals.baseline import parse_baseline

    prog = "maskbank proposals-quality"
    try:
        levels = _levels(args.levels)
        parse_baseline(args.baseline)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.min_voxels < 1:
        print(f"{prog}: error: --min-voxels must be >= 1", file=sys.stderr)
        return 2
    opened = open_bank_scans(prog, args.bank, args.scans)
    if opened is None:
        return 2
    store, ids = opened
    q = bank_quality(store, ids, args.baseline, args.min_voxels, levels)
    if q["scans_with_proposals"] == 0:
        print(
            f"{prog}: error: no scan has proposals; run `maskbank propose {args.bank}` first",
            file=sys.stderr,
        )
        return 1
    q["rows"] = sort_rows(q["rows"], args.sort)
    if args.csv:
        write_csv(args.csv, q["rows"])
    print(json.dumps(q, indent=1) if args.json else format_table(q, args.sort))
    return 0
