"""`maskbank` command line: one module per subcommand under flows/commands/.

Each command module defines `add_parser(subparsers)` and `run(args) -> int`, and
imports heavy libraries (prefect, dask, torch) only inside `run`, so that
`maskbank --help` answers instantly.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from maskbank.flows.commands.options import apply_storage_options, redacted_argv

# Order = order in `maskbank --help`. Modules owned by other parts of the project may
# be absent in a given checkout; a missing one is skipped, not fatal.
COMMANDS = (
    "prepare",
    "propose",
    "proposals_quality",
    "pretrain",
    "evaluate",
    "segment",
    "export",
    "info",
    "verify",
    "report",
    "demo",
)


def _load_commands() -> list:
    modules = []
    for name in COMMANDS:
        try:
            modules.append(importlib.import_module(f"maskbank.flows.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name not in (f"maskbank.flows.commands.{name}",):
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskbank",
        description=(
            "Build and inspect banks of prepared 3D scans (CT/MR/PET) and their mask "
            "proposals for mask-guided self-supervised pretraining."
        ),
        epilog="Run `maskbank <command> --help` for the options of one command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for module in _load_commands():
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command's arguments. A command with ``KEY=VALUE`` overrides (``pretrain``) takes
    them anywhere, also after its options (argparse alone would refuse
    ``BANK --out DIR max_steps=10``: its positionals are consumed together, before ``--out``)."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    if extra and takes_overrides and not any(a.startswith("-") or "=" not in a for a in extra):
        args.overrides.extend(extra)
        extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(parser, argv)
    # The command, for results that record how they were made (credentials redacted).
    args.argv = redacted_argv(argv)
    problem = apply_storage_options(args)
    if problem is not None:
        print(f"maskbank {args.command}: error: {problem}", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``maskbank`` console script: `main`, then exit without the interpreter's last
    garbage collection over every object torch, Prefect and Dask left in memory.

    That collection took ~0.9 s of every command that ran a flow (a third of a grown
    folder's whole re-run); freezing the heap first (``gc.freeze``, as long-lived
    services do) skips it. Nothing depends on it: every bank write is committed (fsync,
    rename) before its command returns, and atexit handlers still run. Only the script
    does this, not `main`, which tests and notebooks call in a process that goes on.
    """
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
