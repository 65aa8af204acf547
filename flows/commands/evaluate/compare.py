"""`maskbank evaluate compare DIR...`: evaluation folders side by side."""

from __future__ import annotations

import argparse

PROG = "maskbank evaluate compare"

DESCRIPTION = """\
Put the results of several evaluations side by side, e.g. the same bank evaluated with a
MASS-pretrained checkpoint, a reconstruction-pretrained one and from scratch. Each DIR is
the --out folder of `maskbank evaluate incontext|finetune|probe`; rows of the same kind
share a table (in-context: mean Dice/HD95/NSD per network and shots; fine-tuning: mean
test Dice per network and label fraction; probe: AUROC and balanced accuracy).
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
    return p


def run(args: argparse.Namespace) -> int:
    from flows.commands.evaluate._common import command_line, emit, fail
    from train.evaluation.compare import COLUMNS, compare, compare_markdown
    from train.evaluation.errors import EvaluationError
    from train.evaluation.report import text_table, write_results

    try:
        result = compare(args.folders)
    except (EvaluationError, ValueError) as exc:
        return fail(PROG, exc)
    result["command"] = command_line(args)
    if args.out:
        write_results(args.out, result, compare_markdown(result))
    text = "\n\n".join(
        f"{kind}:\n{text_table(rows, COLUMNS[kind])}" for kind, rows in result["tables"].items()
    )
    emit(args, result, text)
    return 0
