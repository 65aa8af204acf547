"""Opening the BANK argument and its --scans selection, shared by bank-reading commands."""

from __future__ import annotations

import sys


def open_bank_scans(prog: str, bank: str, scans: str | None):
    """``(Bank, scan ids or None for all)``; on a usage error print why and return None (exit 2)."""
    from bank import Bank
    from bank.errors import BankError

    try:
        store = Bank.open(bank)
    except (BankError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None
    ids = [s.strip() for s in scans.split(",")] if scans else None
    unknown = [s for s in ids or [] if s not in store]
    if unknown:
        print(f"{prog}: error: scans not in the bank: {unknown}", file=sys.stderr)
        return None
    return store, ids
