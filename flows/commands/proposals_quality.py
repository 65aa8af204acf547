"""`maskbank proposals-quality`: how well a bank's proposals cover its labelled structures."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Mapping
from typing import Any

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

SORTS = ("size", "abo", "name")


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


def _baseline_set(scan, baseline: tuple[str, int]):
    """SLIC on the scan's stored (normalised) image, grid and body mask."""
    import numpy as np

    from maskbank.pipeline.proposals.baseline import slic_proposals

    image = np.asarray(scan.read("image"), np.float32)
    body = np.asarray(scan.read("body"), bool)
    return slic_proposals(image, body, scan.spacing, baseline[1])


def bank_quality(
    bank,
    scan_ids=None,
    baseline: str | None = None,
    min_voxels: int = 1,
    levels=(0.5, 0.7, 0.9),
    opened: Mapping[str, Any] | None = None,
) -> dict:
    """Quality report of a bank: abo, recall_* and per-scan rows (with per-structure rows).

    With ``baseline`` (``slic`` or ``slic:N``) each scan and the overall summary
    also carry a ``baseline`` entry scored the same way. ``opened``: scans a caller
    already opened (id -> ``ScanView``), used instead of opening them again.
    """
    import numpy as np

    from maskbank.bank import NoProposalsError
    from maskbank.bank.sampling import ProposalReader
    from maskbank.pipeline.proposals.baseline import parse_baseline
    from maskbank.pipeline.proposals.quality import ProposalArrays, score, summarise

    base_spec = parse_baseline(baseline)
    scans, best_all, base_all, counts, nbytes, rows = [], [], [], [], 0, []
    opened = opened or {}
    for sid in scan_ids or bank.scan_ids:
        scan = opened[sid] if sid in opened else bank.scan(sid)
        try:
            pr = ProposalReader(scan)
        except NoProposalsError:
            continue
        counts.append(pr.count)
        nb = pr.nbytes_stored()
        nbytes += nb
        if not scan.has("label"):
            continue
        label = np.asarray(scan.read("label"))
        names = {int(k): v for k, v in (scan.attrs.get("label_names") or {}).items()}
        sc = score(ProposalArrays.of(pr), label, names or None, min_voxels, levels)
        best_all += list(sc["structures"].values())
        entry = {
            "scan_id": sid,
            **{k: v for k, v in sc.items() if k == "abo" or k.startswith("recall_")},
            "structures": sc["structures"],
            "sizes": sc["sizes"],
            "proposals": pr.count,
            "bytes_per_proposal": nb / max(pr.count, 1),
        }
        base_sc = None
        if base_spec:
            base_ps = _baseline_set(scan, base_spec)
            base_sc = score(base_ps, label, names or None, min_voxels, levels)
            base_all += list(base_sc["structures"].values())
            entry["baseline"] = {
                k: v for k, v in base_sc.items() if k == "abo" or k.startswith("recall_")
            } | {"structures": base_sc["structures"], "proposals": base_ps.count}
        for name, d in sc["structures"].items():
            row = {"scan_id": sid, "structure": name, "voxels": sc["sizes"][name], "best_dice": d}
            if base_sc is not None:
                row["baseline_dice"] = base_sc["structures"][name]
            rows.append(row)
        scans.append(entry)
    out = {
        **summarise(best_all, levels),
        "proposals_per_scan": float(np.mean(counts)) if counts else 0.0,
        "bytes_per_proposal": nbytes / max(sum(counts), 1),
        "scans_with_proposals": len(counts),
        "scans_scored": len(scans),
        "structures": len(best_all),
        "min_voxels": int(min_voxels),
        "levels": list(levels),
        "scans": scans,
        "rows": rows,
    }
    if base_spec:
        out["baseline"] = {
            "method": f"{base_spec[0]}:{base_spec[1]}",
            **summarise(base_all, levels),
        }
    return out


def sort_rows(rows: list[dict], by: str = "size") -> list[dict]:
    """Per-structure rows by size (smallest first), abo (worst best Dice first) or name."""
    if by not in SORTS:
        raise ValueError(f"sort by one of {SORTS}, not {by!r}")
    key = {
        "size": lambda r: (r["voxels"], r["scan_id"], r["structure"]),
        "abo": lambda r: (r["best_dice"], r["scan_id"], r["structure"]),
        "name": lambda r: (r["structure"], r["scan_id"]),
    }[by]
    return sorted(rows, key=key)


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
