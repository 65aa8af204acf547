"""`maskbank prepare`: raw scans -> bank, through the `prepare_bank` Prefect flow on Dask."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from maskbank.flows.commands._prefect_env import apply_cli_defaults
from maskbank.flows.commands.options import (
    add_cluster_options,
    add_planning_options,
    add_run_output_options,
    add_storage_options,
    cluster_kwargs,
    prefect_for_workers,
)
from maskbank.flows.commands.propose import add_proposal_options, config_from_args

if TYPE_CHECKING:
    from maskbank.pipeline.config import PrepareConfig

DESCRIPTION = """\
Prepare raw scans into a bank: read, reorient to RAS, resample to --spacing,
crop to the body, normalise, and publish each scan atomically (one Dask task per scan).

INPUT may be a scan file (.nii/.nii.gz/.nrrd/.mha/.mhd or a DICOM series folder),
a folder (searched recursively; files named like <scan>_label.nii.gz, _seg, _mask
become that scan's label), or a manifest: .csv with a header or .jsonl, columns
image (required), label, modality, dataset, scan_id, label_names (a names file for
that row's label); relative paths are resolved against the manifest's folder. Any
other column (e.g. diagnosis) is stored with the scan as its metadata.

Label names files may be JSON {"1": "liver"}, ITK-SNAP label descriptions,
FreeSurfer colour LUTs or 3D Slicer colour tables; the format is detected.

A folder holding several DICOM series is refused unless a manifest's dicom_series
column names one. Each scan's peak memory is estimated from its header and a scan
over --max-scan-memory fails alone, with the estimate in its reason.

The run is planned before any task starts: a scan already in the bank whose files
have the size and modification time recorded with it, under the same path and with
the same settings, is done without being read; one whose size or time changed is
hashed (SHA-256) and redone only if its content changed. Re-running after a crash or
on a grown folder therefore only does the new work; a changed setting (e.g.
--spacing) redoes the scans it affects. --rehash hashes every file (a content change
that keeps size and time is caught only then). When every input is done, the report
is printed and stored without starting Prefect or Dask (so no flow run is recorded).
Work runs in batches of scans per Dask task (--batch), each scan with its own outcome.
"""

EPILOG = """\
exit status: 0 when every scan is ok or skipped; 1 when any scan failed (the good
scans are in the bank anyway, and the failures are listed with their reasons in
the table and in BANK/reports/prepare-<time>.json); 2 for unusable arguments.

examples:
  maskbank prepare scans/ --bank bank/ --spacing 1.5
  maskbank prepare manifest.csv --bank bank/ --spacing 1,1,2.5 --workers 8
  maskbank prepare scans/ --bank bank/ --dask-address tcp://scheduler:8786
  maskbank prepare scans/ --bank bank/ --proposals --scales 2000,6000
  maskbank prepare labelled/ --bank eval-bank/ --label-names FreeSurferColorLUT.txt
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare",
        help="prepare raw scans (files, folders, manifests) into a bank",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="scan file, folder or manifest")
    p.add_argument("--bank", required=True, help="bank folder or s3:// URL (created when missing)")
    add_storage_options(p)
    p.add_argument(
        "--spacing",
        default="1.5",
        metavar="MM",
        help="target voxel spacing in mm: one number (isotropic) or three, e.g. 1.5,1.5,3 "
        "(default: 1.5)",
    )
    p.add_argument(
        "--modality",
        default="auto",
        choices=["auto", "ct", "mr", "pet"],
        help="modality of every input (default auto: CT is detected from Hounsfield units, "
        "else MR; PET must be declared). A manifest's modality column overrides it per scan.",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset name recorded with each scan (default: the input folder's or "
        "manifest's name; a manifest's dataset column overrides it)",
    )
    p.add_argument(
        "--label-names",
        default=None,
        metavar="FILE",
        help="names of the label values for every scan with a label (JSON, ITK-SNAP, "
        "FreeSurfer LUT or Slicer colour table); a manifest's label_names column "
        "overrides it per scan",
    )
    p.add_argument(
        "--max-scan-memory",
        default=None,
        metavar="SIZE",
        help="per-scan memory budget, e.g. 6G or 512M: a scan whose estimated peak "
        "(input, resampled grid, proposals) is larger fails before it is read (default: "
        "3/4 of this machine's memory divided by --workers; with --dask-address, 3/4 of "
        "the worker machine's)",
    )
    p.add_argument(
        "--id-from",
        choices=["name", "hash"],
        default="name",
        help="scan ids from file names (default) or, with 'hash', the first 12 hex digits "
        "of the SHA-256 of each source's content (longer where two differ only later): "
        "no file or folder name (patient identifiers hide there) becomes an id, a "
        "dataset name or a path stored in the bank",
    )
    add_cluster_options(p)
    add_planning_options(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (which scans are new, changed or done, and why) and stop; "
        "nothing is read but file sizes and times, nothing is written, no task starts",
    )
    add_run_output_options(p)
    p.add_argument(
        "--proposals",
        action="store_true",
        help="also make each scan's mask proposals in the same task (options below; "
        "the same as `maskbank propose`)",
    )
    add_proposal_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Plan first, in plain code (file sizes and times, the bank's index; no Prefect, no
    Dask): a dry run, or a plan without work, prints and exits there; otherwise the flow
    takes the plan over and runs the work."""
    from maskbank.flows.inputs import InputError, collect_inputs, parse_spacing
    from maskbank.flows.outcomes import RunClock
    from maskbank.pipeline.config import PrepareConfig, default_scan_memory, parse_size
    from maskbank.pipeline.errors import ScanError
    from maskbank.pipeline.label_names import read_label_names

    clock = RunClock()  # the report's seconds: collecting and planning on, as in the flow
    try:
        spacing = parse_spacing(args.spacing)
        if args.max_scan_memory is not None:
            budget: int | None = parse_size(args.max_scan_memory)
        else:  # a remote cluster's workers size it from their own memory
            budget = None if args.dask_address else default_scan_memory(max(1, args.workers))
        config = PrepareConfig(
            spacing=spacing,
            modality=args.modality,
            max_scan_memory=budget,
            id_from=args.id_from,
        )
        proposals = config_from_args(args).to_dict() if args.proposals else None
        label_names = os.path.abspath(args.label_names) if args.label_names else None
        if label_names:
            read_label_names(label_names)  # a bad names file is a usage error
        # fail fast, before Prefect starts; absolute, as the flow collects them
        inputs = [os.path.abspath(i) for i in args.inputs]
        scans = collect_inputs(inputs, args.dataset, label_names, args.id_from)
    except (InputError, ValueError, ScanError) as exc:
        print(f"maskbank prepare: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(args, scans, config)
    from maskbank.bank import Bank, BankError
    from maskbank.bank.writing import resolve_location
    from maskbank.flows.planning import hand_over, plan_prepare_run

    try:  # a bad --bank (URL, non-empty non-bank folder) is a usage error, before Prefect starts
        store = Bank.create(args.bank)
    except (BankError, OSError) as exc:
        print(f"maskbank prepare: error: --bank {args.bank}: {exc}", file=sys.stderr)
        return 2
    run_plan = plan_prepare_run(
        store,
        resolve_location(args.bank),  # a URL stays as it is
        inputs,
        config,
        args.dataset,
        label_names,
        rehash=args.rehash,
        proposals=proposals,
        scans=scans,
    )
    print(f"{len(scans)} scans -> {args.bank}", file=sys.stderr)
    if not run_plan.work:
        from maskbank.flows.planning import settled_prepare_report

        kw = cluster_kwargs(args)
        settings = run_plan.settings(
            config.to_dict(), config.fingerprint(), kw["workers"], kw["dask_address"], label_names
        )
        return _report(args, settled_prepare_report(store, run_plan, settings, clock))
    apply_cli_defaults(args.verbose)

    with prefect_for_workers(args), hand_over(run_plan, store):  # the flow takes this plan
        from maskbank.flows.prepare import prepare_bank

        report = prepare_bank(
            inputs=inputs,
            bank=args.bank,
            config=config.to_dict(),
            dataset=args.dataset,
            progress=not args.no_progress,
            proposals=proposals,
            label_names=label_names,
            batch=args.batch,
            rehash=args.rehash,
            **cluster_kwargs(args),
        )
    return _report(args, report)


def _report(args: argparse.Namespace, report: dict) -> int:
    """Print a run's report (table or JSON); the exit status: 1 when any scan failed."""
    from maskbank.flows.report import print_run_report

    return print_run_report(report, args.json)


#: Rows of work a dry run lists (the counts cover every scan).
DRY_RUN_ROWS = 200


def _dry_run(args: argparse.Namespace, scans: list, config: PrepareConfig) -> int:
    """Plan in plain code (no Prefect, no file read but its size and time) and print it."""
    from maskbank.bank import Bank, BankError, NotABankError
    from maskbank.flows.planning import plan_prepare
    from maskbank.flows.report import table

    try:
        rows = Bank.open(args.bank).index_rows
    except NotABankError:
        rows = {}  # no bank yet: everything is new
    except BankError as exc:
        print(f"maskbank prepare: error: --bank {args.bank}: {exc}", file=sys.stderr)
        return 2
    plan = plan_prepare(
        scans,
        rows,
        config.fingerprint(),
        rehash=args.rehash,
        keep_paths=args.id_from != "hash",
    )
    work = plan.work
    if args.json:
        print(json.dumps({"dry_run": True, "bank": args.bank, "plan": plan.to_json()}, indent=1))
        return 0
    if work:
        lines = [
            [
                i.scan.scan_id,
                i.category,
                i.reason or "",
                i.scan.image,
                i.scan.label or "",
                i.scan.dataset or "",
                i.scan.modality or args.modality,
            ]
            for i in work[:DRY_RUN_ROWS]
        ]
        print(table(["scan", "plan", "why", "image", "label", "dataset", "modality"], lines))
        if len(work) > DRY_RUN_ROWS:
            print(f"... and {len(work) - DRY_RUN_ROWS} more")
    c = plan.counts()
    print(
        f"\nplan: {c['new']} new, {c['changed']} changed, {c['done']} done: "
        f"{len(work)} scans would be prepared into {args.bank} (dry run)"
    )
    for reason, n in plan.reasons().items():
        print(f"  changed: {n} x {reason}")
    return 0
