"""`maskbank evaluate`: does the pretrained encoder help? One subcommand per protocol.

Each subcommand module defines ``add_parser(subparsers)`` and ``run(args)``; the
evaluation code itself lives in ``train/evaluation`` (no Prefect, no Dask).
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = ("incontext", "finetune", "probe", "compare")

DESCRIPTION = """\
Measure what pretraining bought, on your own labelled scans, beside a baseline of the
same budget:

  incontext  in-context few-shot segmentation of labelled structures (vs an untrained net)
  finetune   fine-tuning with 10-100 % of the labels (vs the same network from scratch)
  probe      frozen-encoder prediction of a scan-level target (vs a random encoder)
  compare    several result folders side by side

Each writes OUT/results.json (every number, the command, checkpoint hashes, the bank
fingerprint), OUT/results.md and PNG figures.
"""


def _modules() -> list:
    mods = []
    for name in SUBCOMMANDS:
        try:
            mods.append(importlib.import_module(f"maskbank.flows.commands.evaluate.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"maskbank.flows.commands.evaluate.{name}":
                raise
    return mods


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="downstream evaluation: in-context, fine-tuning, frozen probe, compare",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="evaluation", metavar="<evaluation>", required=True)
    for mod in _modules():
        q = mod.add_parser(sub)
        q.set_defaults(_evaluate=mod.run)
    return p


def run(args: argparse.Namespace) -> int:
    return int(args._evaluate(args) or 0)
