"""`maskbank verify`: the full integrity check of a bank."""

from __future__ import annotations

import argparse
import sys

from maskbank.flows.commands.options import add_storage_options


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "verify",
        help="full integrity check of a bank (decodes every chunk)",
        description="Check a bank end to end: the index matches the scan groups, no "
        "interrupted write is left over, every array decodes and matches its recorded "
        "shape and checksum, required attributes are present, proposals belong to the scan "
        "version they were made from. Slow on purpose. Works on a bank you may only read. "
        "Exit status: 0 healthy, 1 problems found (listed one per line), 2 not a bank.",
    )
    p.add_argument("bank", metavar="BANK", help="bank path or URL")
    add_storage_options(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="first clean up interrupted writes whose writer is gone and rebuild index.json "
        "from the scans (a corrupt, missing or stale index), then remove every scan whose "
        "data fail the check, so that re-running `maskbank prepare` and `maskbank propose` "
        "on the same inputs rebuilds them; needs write access",
    )
    return p


def damaged_scans(bank, problems: list[str]) -> dict[str, str]:
    """Scan id -> its first problem, for the verify lines that concern one scan's data."""
    out: dict[str, str] = {}
    for sid in bank.scan_ids:
        for line in problems:
            if line.startswith(f"{sid}: "):
                out.setdefault(sid, line[len(sid) + 2 :])
    return out


def run(args: argparse.Namespace) -> int:
    from maskbank.bank import Bank, BankError

    try:
        if args.repair:
            bank = Bank.open(args.bank, mode="a", strict_index=False)
            for action in bank.recover():
                print(f"repaired: {action}")
            bank.rebuild_index()
            print(f"repaired: rebuilt index.json from {len(bank)} scans")
            for sid, why in damaged_scans(bank, bank.verify()).items():
                bank.delete_scan(sid)
                print(
                    f"repaired: removed scan {sid} ({why}); re-run `maskbank prepare` on its "
                    "source and `maskbank propose` to rebuild it"
                )
        else:
            bank = Bank.open(args.bank, strict_index=False)  # a corrupt index is a finding
        problems = bank.verify()
    except (BankError, FileNotFoundError) as exc:
        print(f"maskbank verify: error: {exc}", file=sys.stderr)
        return 2
    if problems:
        print(f"{len(problems)} problem(s) in {args.bank}:")
        for line in problems:
            print(f"  {line}")
        return 1
    print(f"ok: {len(bank)} scans in {args.bank} verified")
    return 0
