"""`maskbank report`: a self-contained HTML quality report of a bank."""

from __future__ import annotations

import argparse
import sys

from maskbank.flows.commands.options import add_storage_options

DESCRIPTION = """\
Write DIR/index.html: the scan table, intensity histograms after normalisation per
modality, proposal counts and sizes per scan, a montage of each scan with a sample of
its proposals, the proposal quality table where scans have labels, and a list of
suspicious scans (empty or tiny body mask, extreme spacing or shape, too few
proposals, failed verification, normalisation outliers), each with the reason.
Figures are embedded in the page and also written to DIR/figures/.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="HTML quality report of a bank: tables, figures, suspicious scans",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from maskbank.flows.commands.options import add_scan_selection, positive_int

    p.add_argument("bank", metavar="BANK", help="bank folder or URL")
    add_storage_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for index.html")
    add_scan_selection(p)
    p.add_argument(
        "--montage-scans",
        type=positive_int,
        default=48,
        help="scans drawn in the montage; a larger bank shows a random sample (default 48)",
    )
    p.add_argument(
        "--min-proposals",
        type=int,
        default=100,
        help="a scan with fewer proposals is listed as suspicious (default 100)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the integrity check")
    p.add_argument("--no-quality", action="store_true", help="skip proposal quality against labels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from maskbank.flows.commands.options import open_bank_scans
    from maskbank.flows.qa_report import ReportOptions, build_report

    opened = open_bank_scans("maskbank report", args.bank, args.scans)
    if opened is None:
        return 2
    bank, ids = opened
    if args.min_proposals < 0:
        print("maskbank report: error: --min-proposals must be >= 0", file=sys.stderr)
        return 2
    options = ReportOptions(
        scan_ids=tuple(ids) if ids else None,
        montage_scans=args.montage_scans,
        min_proposals=args.min_proposals,
        verify=not args.no_verify,
        quality=not args.no_quality,
        progress=not args.no_progress,
    )
    page = build_report(bank, args.out, options)
    print(f"report written to {page}")
    return 0
