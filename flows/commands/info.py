"""`maskbank info`: what a bank holds, from its index (fast, opens no scan)."""

from __future__ import annotations

import argparse
import json

from maskbank.flows.commands.options import add_storage_options


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info",
        help="scans, voxels and bytes on disk of a bank, per modality and dataset",
        description="Summarise a bank from its index: number of scans, voxels, bytes on "
        "disk, per modality and per dataset, and proposal counts. Works on local paths "
        "and fsspec URLs (s3://...). Exit status 2 if BANK is not a bank.",
    )
    p.add_argument("bank", metavar="BANK", help="bank path or URL")
    add_storage_options(p)
    p.add_argument("--json", action="store_true", help="print bank.summary() as JSON")
    return p


def format_summary(summary: dict) -> str:
    from maskbank.flows.report import human_bytes, human_count, table

    lines = [
        f"bank {summary['location']} (format v{summary['format_version']})",
        f"{summary['scans']} scans, {human_count(summary['voxels'])} voxels, "
        f"{human_bytes(summary['bytes'])} on disk"
        + (f" ({summary['bytes_per_voxel']:.2f} bytes/voxel)" if summary.get("voxels") else "")
        + f", {summary.get('labelled_scans', 0)} with labels",
    ]
    for key, title in (("by_modality", "modality"), ("by_dataset", "dataset")):
        groups = summary.get(key) or {}
        if groups:
            rows = [
                [name, g["scans"], human_count(g["voxels"]), human_bytes(g["bytes"])]
                for name, g in groups.items()
            ]
            lines += ["", table([title, "scans", "voxels", "on disk"], rows, right={1, 2, 3})]
    props = summary.get("proposals") or {}
    if props.get("scans_with_proposals"):
        lines += [
            "",
            f"proposals: {props['total']} in {props['scans_with_proposals']} scans "
            f"({props['per_scan']:.0f}/scan, {human_bytes(props['bytes'])}, "
            f"{props['bytes_per_proposal']:.0f} bytes/proposal)",
        ]
    sets = summary.get("proposal_sets") or {}
    if sets:
        rows = [
            [name, g["scans"], g["proposals"], human_bytes(g["bytes"])] for name, g in sets.items()
        ]
        lines += [
            "",
            table(["proposal set", "scans", "proposals", "on disk"], rows, right={1, 2, 3}),
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from maskbank.flows.commands.options import open_bank_scans

    opened = open_bank_scans("maskbank info", args.bank)
    if opened is None:
        return 2
    summary = opened[0].summary()
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
    return 0
