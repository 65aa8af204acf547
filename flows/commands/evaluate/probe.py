"""`maskbank evaluate probe`: frozen-encoder prediction of a scan-level target vs a random encoder."""

from __future__ import annotations

import argparse
import sys

from ._common import (
    add_common,
    command_line,
    device_of,
    fail,
    finish,
    load_networks,
    open_bank,
)

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
    from maskbank.train.evaluation import probe
    from maskbank.train.evaluation.checkpoint import RANDOM
    from maskbank.train.evaluation.errors import EvaluationError

    try:
        options = probe.ProbeOptions(
            args.target,
            folds=args.folds,
            seed=args.seed,
            device=str(device_of(args.device)),
            settings=probe.ProbeSettings(epochs=args.epochs),
        )
    except EvaluationError as exc:
        return fail(PROG, exc)
    opened = open_bank(PROG, args)
    if opened is None:
        return 2
    bank, scan_ids = opened
    try:
        result = probe.run(
            bank,
            load_networks(args, RANDOM),
            options,
            scan_ids=scan_ids,
            progress=not (args.no_progress or args.json),
            command=command_line(args),
        )
    except EvaluationError as exc:
        return fail(PROG, exc)
    for warning in result.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    finish(args, result)
    return 0
