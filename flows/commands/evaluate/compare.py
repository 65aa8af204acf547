"""`maskbank evaluate compare DIR...`: evaluation folders side by side."""

from __future__ import annotations

import argparse
import sys

PROG = "maskbank evaluate compare"

DESCRIPTION = """\
Put the results of several evaluations side by side, e.g. fine-tuning with a
MASS-pretrained checkpoint, a reconstruction-pretrained one and from scratch, or the
in-context results of several MASS runs (mask sources, budgets). Each DIR is the --out
folder of `maskbank evaluate incontext|finetune|probe`; rows of the same kind share a
table (in-context: the headline Dice with its interval, HD95/ASD/NSD per network and
shots; fine-tuning: mean test Dice per network and label fraction; probe: AUROC and
balanced accuracy).

Folders must come from the same bank (the fingerprint of its data, label maps and label
names) and, per kind, share options and classes; otherwise the command names every
difference and exits 2. --force compares them anyway and prints the differences.
"""

EPILOG = """\
example:
  maskbank evaluate compare eval/mass eval/reconstruction eval/scratch --out eval/compare
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="several evaluation folders side by side",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folders", nargs="+", metavar="DIR", help="evaluation output folders")
    p.add_argument("--out", default=None, metavar="DIR", help="write results.json/md here")
    p.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.add_argument(
        "--force",
        action="store_true",
        help="compare folders whose bank fingerprint, options or classes differ (the "
        "differences are printed and recorded)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from maskbank.flows.commands.evaluate._common import command_line, emit, fail
    from maskbank.train.evaluation.compare import COLUMNS, compare, compare_markdown
    from maskbank.train.evaluation.errors import EvaluationError
    from maskbank.train.evaluation.report import text_table, write_results

    try:
        result = compare(args.folders, force=args.force)
    except (EvaluationError, ValueError) as exc:
        return fail(PROG, exc)
    for diff in result["differences"]:
        print(f"{PROG}: warning: compared despite a difference: {diff}", file=sys.stderr)
    result["command"] = command_line(args)
    if args.out:
        write_results(args.out, result, compare_markdown(result))
    text = "\n\n".join(
        f"{kind}:\n{text_table(rows, COLUMNS[kind])}" for kind, rows in result["tables"].items()
    )
    emit(args, result, text)
    return 0
