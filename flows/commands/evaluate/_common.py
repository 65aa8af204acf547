"""Options and steps every evaluation subcommand shares."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maskbank.flows.commands.options import add_scan_selection, open_bank_scans


def add_common(
    p: argparse.ArgumentParser,
    baseline: str = "random",
    multiple: bool = False,
    extra_help: str = "",
) -> None:
    """--checkpoint, --bank, --preset, --seed, --scans, --out, --json, --device, --no-progress.

    ``multiple``: --checkpoint may be repeated (a list in ``args.checkpoint``).
    """
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append" if multiple else "store",
        metavar=f"CKPT|{baseline}",
        help="checkpoint file or run directory of `maskbank pretrain` (EMA weights when "
        f"present), or '{baseline}' for the seeded untrained network of --preset" + extra_help,
    )
    p.add_argument("--bank", required=True, help="labelled bank (path or fsspec URL)")
    p.add_argument(
        "--preset",
        default=None,
        help=f"network preset (tiny, small, base); needed with '{baseline}' "
        "(default tiny), checked against a checkpoint's",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of draws and untrained weights")
    add_scan_selection(p)
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: none)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help=f"do not run '{baseline}' (the same preset, seeded) beside the checkpoint",
    )


def load_networks(args: argparse.Namespace, baseline: str) -> list:
    """The checkpoint's network, then the baseline of its preset and crop (unless asked not)."""
    from maskbank.train.evaluation.checkpoint import load_with_baseline

    return load_with_baseline(
        args.checkpoint, baseline, args.preset, args.seed, add_baseline=not args.no_baseline
    )


def finish(args: argparse.Namespace, result) -> Path | None:
    """Write OUT/results.{json,md} and the figures (with --out), print the results."""
    out = result.write(args.out) if args.out else None
    emit(args, result.data, result.text())
    return out


def command_line(args: argparse.Namespace) -> list[str]:
    """The exact command, as typed (``flows.cli.main`` records its argv on ``args``)."""
    return ["maskbank", *getattr(args, "argv", sys.argv[1:])]


def device_of(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def open_bank(prog: str, args: argparse.Namespace):
    """``(bank, scan ids or None)`` or None after printing why (exit 2)."""
    return open_bank_scans(prog, args.bank, args.scans)


def fail(prog: str, exc: Exception) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def emit(args: argparse.Namespace, results: dict, text: str) -> None:
    """Print JSON (--json) or the human table, and where the outputs went."""
    from maskbank.train.evaluation.report import _clean

    if args.json:
        print(json.dumps(_clean(results), indent=1))
        return
    print(text)
    if args.out:
        print(f"\nresults: {Path(args.out) / 'results.md'} (all numbers: results.json)")
