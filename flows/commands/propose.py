"""`maskbank propose`: mask proposals for the scans of an existing bank (Prefect flow on Dask)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from maskbank.flows.commands._prefect_env import apply_cli_defaults
from maskbank.flows.commands.options import (
    add_cluster_options,
    add_planning_options,
    add_run_output_options,
    add_scan_selection,
    add_storage_options,
    cluster_kwargs,
    open_bank_scans,
)

if TYPE_CHECKING:
    from maskbank.flows.planning import ProposalPlan
    from maskbank.pipeline.proposals.config import ProposalConfig

DESCRIPTION = """\
Make class-agnostic 3D mask proposals for every scan of BANK (or --scans): supervoxels,
their merge hierarchy over the region adjacency graph, and intensity-window connected
components, filtered by size / inside-body / not-whole-body / near-duplicates, and
stored compactly in each scan's proposals part (see docs/bank-format.md).

Scans whose proposals were made with the same options from the same scan are skipped.
The run is planned first, from each scan's attributes: when every scan is up to date it
prints and stores the report without starting Prefect, Dask or the
proposal engine (so no flow run is recorded).

A bank may hold several named proposal sets per scan: --name NAME stores them as set NAME
(default: "default", the one training uses unless data.proposals says otherwise).
--import DIR|MANIFEST --name NAME turns existing masks (label maps or binary masks on the
source scan's grid, e.g. TotalSegmentator output) into set NAME: DIR holds <scan_id>/
(mask files) or <scan_id>.nii.gz per scan; a .csv/.jsonl MANIFEST has columns scan_id,path.
"""

EPILOG = """\
examples:
  maskbank propose bank/
  maskbank propose bank/ --generators hierarchy --scales 2000,6000 --max-proposals 3000
  maskbank propose bank/ --scans scan-a,scan-b --force --json
  maskbank propose bank/ --name slic --generators supervoxels
  maskbank propose bank/ --import totalseg/ --name totalseg
"""


def add_proposal_options(p: argparse.ArgumentParser) -> None:
    """The proposal option set (shared with `maskbank prepare --proposals`)."""
    g = p.add_argument_group("proposal options")
    g.add_argument(
        "--generators",
        default=None,
        help="comma list of hierarchy, supervoxels, windows (default: all three)",
    )
    g.add_argument(
        "--scales",
        default=None,
        help="supervoxels per scan, one hierarchy per value, comma list (default: automatic, "
        "from the body's volume and the grid)",
    )
    g.add_argument(
        "--max-proposals",
        type=int,
        default=None,
        help="cap per scan (default: the engine's, ProposalConfig.max_proposals)",
    )
    g.add_argument(
        "--min-volume",
        type=float,
        default=None,
        metavar="MM3",
        help="minimum proposal volume in mm^3 for every modality (default: relative to the "
        "body, at least 20 voxels)",
    )
    g.add_argument(
        "--dedup-iou", type=float, default=None, help="near-duplicate IoU (default: 0.95)"
    )
    g.add_argument(
        "--max-bytes-per-proposal",
        type=float,
        default=None,
        metavar="B",
        help="stored bytes per proposal each scan's set must fit: the layers costing most per "
        "proposal are dropped until it does; 0 = no budget (default: 200)",
    )


def config_from_args(args: argparse.Namespace) -> ProposalConfig:
    """The engine's defaults (``ProposalConfig``) with the options that were given."""
    from maskbank.pipeline.proposals.config import ProposalConfig

    kw: dict = {}
    if args.generators is not None:
        kw["generators"] = tuple(g.strip() for g in args.generators.split(",") if g.strip())
    if args.scales is not None:
        kw["scales"] = tuple(int(s) for s in args.scales.split(",") if s.strip())
    if args.max_proposals is not None:
        kw["max_proposals"] = args.max_proposals
    if args.dedup_iou is not None:
        kw["dedup_iou"] = args.dedup_iou
    if getattr(args, "max_bytes_per_proposal", None) is not None:
        kw["max_bytes_per_proposal"] = args.max_bytes_per_proposal
    if args.min_volume is not None:
        kw["min_volume_mm3"] = {m: args.min_volume for m in ("ct", "mr", "pet")}
    return ProposalConfig(**kw)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "propose",
        help="make mask proposals for the scans of an existing bank",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bank", metavar="BANK", help="bank folder or s3:// URL")
    add_storage_options(p)
    add_scan_selection(p)
    add_proposal_options(p)
    add_cluster_options(p, processes=False)
    p.add_argument(
        "--name",
        default=None,
        help="proposal set to write (default: 'default'; required with --import)",
    )
    p.add_argument(
        "--import",
        dest="import_from",
        default=None,
        metavar="DIR|MANIFEST",
        help="import existing masks as set --name instead of making proposals",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="redo scans that are up to date (with --import: allow --name default)",
    )
    add_planning_options(p, rehash=False)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print how many scans have up-to-date proposals and which would be made, "
        "and stop (reads two small attribute files per scan; no task starts)",
    )
    add_run_output_options(p)
    return p


def _set_name(args: argparse.Namespace) -> str:
    """The set to write; ValueError for a bad name or an import without a safe one."""
    from maskbank.bank.writing import DEFAULT_SET, check_set_name

    if args.import_from is not None:
        if args.name is None:
            raise ValueError("--import needs --name NAME (the proposal set to create)")
        if args.name == DEFAULT_SET and not args.force:
            raise ValueError(
                "--import --name default would replace the engine's proposals; "
                "pick another name or add --force"
            )
    return check_set_name(args.name or DEFAULT_SET)


def run(args: argparse.Namespace) -> int:
    """Plan first, in plain code (the bank's attributes only; no Prefect, no Dask, no
    proposal engine): a dry run, or a plan without work, prints and exits there;
    otherwise the flow takes the plan over and runs the work."""
    try:
        cfg = config_from_args(args)
        name = _set_name(args)
    except ValueError as exc:
        print(f"maskbank propose: error: {exc}", file=sys.stderr)
        return 2
    from maskbank.bank.writing import resolve_location
    from maskbank.flows.outcomes import RunClock
    from maskbank.flows.planning import hand_over, plan_proposals, settled_report

    clock = RunClock()  # the report's seconds: opening and planning on, as in the flow
    # a run writes: open for writing once, and the flow takes this very bank (`hand_over`)
    mode = "r" if args.dry_run or args.import_from is not None else "a"
    opened = open_bank_scans("maskbank propose", args.bank, args.scans, mode)
    if opened is None:
        return 2
    store, ids = opened
    if args.import_from is not None:
        apply_cli_defaults(args.verbose)
        return _run_import(args, ids, name)
    bank_path = resolve_location(args.bank)  # a URL stays as it is
    plan = plan_proposals(
        store, bank_path, ids or store.scan_ids, cfg.fingerprint(), name, args.force
    )
    if args.dry_run:
        return _dry_run(args, plan)
    if not plan.work:
        return _report(args, settled_report(store, plan, cfg.to_dict(), clock))
    apply_cli_defaults(args.verbose)
    from maskbank.flows.propose import propose_bank

    with hand_over(plan, store):  # the flow plans these very scans: it takes this plan
        report = propose_bank(
            bank=args.bank,  # the flow resolves a local path
            config=cfg.to_dict(),
            scan_ids=ids,
            force=args.force,
            progress=not args.no_progress,
            name=name,
            batch=args.batch,
            **cluster_kwargs(args),
        )
    return _report(args, report)


def _report(args: argparse.Namespace, report: dict) -> int:
    """Print a run's report (table or JSON); the exit status: 1 when any scan failed."""
    from maskbank.flows.report import print_run_report

    return print_run_report(report, args.json)


def _dry_run(args: argparse.Namespace, plan: ProposalPlan) -> int:
    """The proposals plan: which scans are up to date, which are work."""
    work = plan.work
    if args.json:
        plan_json = {"counts": plan.counts(), "work": work}
        print(json.dumps({"dry_run": True, "bank": args.bank, "plan": plan_json}, indent=1))
        return 0
    shown = ", ".join(work[:20]) + (f", ... ({len(work) - 20} more)" if len(work) > 20 else "")
    if work:
        print(f"to make: {shown}")
    print(
        f"plan: {len(work)} scans need proposals set {plan.name!r}, {len(plan.done)} are up to "
        f"date (dry run, bank {args.bank})"
    )
    return 0


def _run_import(args: argparse.Namespace, ids: list[str] | None, name: str) -> int:
    from maskbank.flows.import_masks import import_masks, mask_sources

    try:
        mask_sources(args.import_from)  # a bad source is a usage error, before any task
    except (OSError, ValueError) as exc:
        print(f"maskbank propose: error: {exc}", file=sys.stderr)
        return 2
    report = import_masks(
        bank=args.bank,
        source=str(args.import_from),
        name=name,
        scan_ids=ids,
        progress=not args.no_progress,
        **cluster_kwargs(args),
    )
    return _report(args, report)
