"""`maskbank evaluate probe`: frozen-encoder prediction of a scan-level target vs a random encoder."""

from __future__ import annotations

import argparse
import sys

from ._common import add_common, device_of, fail, finish, load_networks, open_bank

PROG = "maskbank evaluate probe"

DESCRIPTION = """\
Does the frozen pretrained encoder predict a scan-level target? Each scan's deepest
encoder features (whole scan, windows of the network's crop) are pooled by a small
attention head trained per fold of a stratified k-fold cross-validation. The seeded
random encoder of the same preset runs beside it with the same folds and head.

--target is a metadata column of the manifest (e.g. diagnosis), or has:<class>
(does the scan's label map contain the class; by label name or value).

Writes OUT/results.json (every number, folds, out-of-fold predictions), results.md
and probe.png.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "probe",
        help="frozen-encoder probe of a scan-level target (vs a random encoder)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p, baseline="random")
    p.add_argument(
        "--target",
        required=True,
        metavar="COLUMN|has:CLASS",
        help="metadata column (e.g. diagnosis) or has:<class name or label value>",
    )
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--epochs", type=int, default=60, help="head training epochs (default 60)")
    return p


def run(args: argparse.Namespace) -> int:
    from maskbank.train.evaluation.checkpoint import RANDOM
    from maskbank.train.evaluation.errors import EvaluationError
    from maskbank.train.evaluation.probe import (
        PLOT,
        ProbeSettings,
        probe_markdown,
        probe_plot,
        probe_text,
        run_probe,
    )

    if args.folds < 2:
        return fail(PROG, ValueError(f"--folds {args.folds}: give at least 2"))
    if args.epochs < 1:
        return fail(PROG, ValueError(f"--epochs {args.epochs}: give at least 1"))
    opened = open_bank(PROG, args)
    if opened is None:
        return 2
    bank, scan_ids = opened
    try:
        networks = load_networks(args, RANDOM)
        results = run_probe(
            networks,
            bank,
            scan_ids,
            args.target,
            folds=args.folds,
            settings=ProbeSettings(epochs=args.epochs),
            seed=args.seed,
            device=device_of(args.device),
            progress=not (args.no_progress or args.json),
        )
    except EvaluationError as exc:
        return fail(PROG, exc)
    for warning in results["warnings"]:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    out = finish(
        args, bank, networks, results, lambda r: probe_markdown(r, r["run"]), probe_text(results)
    )
    if out is not None:
        probe_plot(out / PLOT, results)
    return 0
