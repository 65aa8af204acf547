"""`maskbank proposals-quality`: how well a bank's proposals cover its labelled structures."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
For every scan with an evaluation label map and proposals, and every labelled structure
(each label value; lesion-like values split into connected components), the best Dice
over all proposals of that scan.  Prints per-scan and overall average best Dice (ABO),
recall at Dice >= 0.5 and >= 0.7, proposals per scan and bytes per proposal.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "proposals-quality",
        help="best-Dice coverage of labelled structures by the proposals (ABO, recall)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bank", metavar="BANK", help="bank folder or URL")
    p.add_argument("--scans", default=None, help="comma list of scan ids (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def bank_quality(bank, scan_ids=None) -> dict:
    """Quality report of a bank (dict with keys abo, recall_50, recall_70, ... and scans)."""
    import numpy as np

    from bank.proposals import NoProposalsError, ProposalReader
    from pipeline.proposals.quality import ProposalArrays, score, summarise

    scans, best_all, counts, nbytes = [], [], [], 0
    for sid in scan_ids or bank.scan_ids:
        scan = bank.scan(sid)
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
        sc = score(ProposalArrays.of(pr), label, names or None)
        best_all += list(sc["structures"].values())
        scans.append(
            {
                "scan_id": sid,
                **{k: sc[k] for k in ("abo", "recall_50", "recall_70")},
                "structures": sc["structures"],
                "proposals": pr.count,
                "bytes_per_proposal": nb / max(pr.count, 1),
            }
        )
    overall = summarise(best_all)
    return {
        **overall,
        "proposals_per_scan": float(np.mean(counts)) if counts else 0.0,
        "bytes_per_proposal": nbytes / max(sum(counts), 1),
        "scans_with_proposals": len(counts),
        "scans_scored": len(scans),
        "structures": len(best_all),
        "scans": scans,
    }


def format_table(q: dict) -> str:
    lines = [f"{'scan':<32} {'ABO':>6} {'R@.5':>6} {'R@.7':>6} {'props':>7} {'B/prop':>8}"]
    for s in q["scans"]:
        lines.append(
            f"{s['scan_id']:<32} {s['abo']:>6.3f} {s['recall_50']:>6.3f} {s['recall_70']:>6.3f} "
            f"{s['proposals']:>7} {s['bytes_per_proposal']:>8.1f}"
        )
        for name, d in s["structures"].items():
            lines.append(f"    {name:<28} best Dice {d:.3f}")
    lines.append(
        f"{'overall':<32} {q['abo']:>6.3f} {q['recall_50']:>6.3f} {q['recall_70']:>6.3f} "
        f"{q['proposals_per_scan']:>7.0f} {q['bytes_per_proposal']:>8.1f}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from flows.commands._bank_args import open_bank_scans

    opened = open_bank_scans("maskbank proposals-quality", args.bank, args.scans)
    if opened is None:
        return 2
    store, ids = opened
    q = bank_quality(store, ids)
    if q["scans_with_proposals"] == 0:
        print(
            "maskbank proposals-quality: error: no scan has proposals; run `maskbank propose "
            f"{args.bank}` first",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(q, indent=1) if args.json else format_table(q))
    return 0
