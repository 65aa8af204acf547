"""Command-line options the `maskbank` commands share, and what they turn into.

Parsing stays light (no prefect, dask or torch here) so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error, exit 2, otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def add_workers_option(p: argparse.ArgumentParser, default: int | None = None) -> None:
    """``--workers N``: scans in parallel (default: min(4, CPUs))."""
    shown = "min(4, CPUs)" if default is None else str(default)
    p.add_argument(
        "--workers",
        type=positive_int,
        default=min(4, os.cpu_count() or 1) if default is None else default,
        metavar="N",
        help=f"scans in parallel on a local Dask cluster (default: {shown}); with "
        "--dask-address, at least this many (the cluster's threads if it has more)",
    )


def add_cluster_options(p: argparse.ArgumentParser, processes: bool = True) -> None:
    """``--workers``, ``--dask-address`` and (with ``processes``) ``--processes``."""
    add_workers_option(p)
    p.add_argument(
        "--dask-address",
        default=None,
        metavar="ADDR",
        help="run the tasks on an existing Dask cluster (e.g. tcp://host:8786, started "
        "by dask-jobqueue on SLURM; see docs/cluster.md) instead of a local one",
    )
    if processes:
        p.add_argument(
            "--processes",
            action="store_true",
            help="local cluster of worker processes instead of threads; starts one loopback "
            "Prefect server for them when PREFECT_API_URL is unset",
        )


def cluster_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The flow parameters (``workers``, ``dask_address``, ``processes``) of the options."""
    return {
        "workers": args.workers,
        "dask_address": args.dask_address,
        "processes": getattr(args, "processes", False),
    }


@contextmanager
def prefect_for_workers(args: argparse.Namespace) -> Iterator[None]:
    """Local process workers report to a Prefect server: start one on loopback for the
    run when ``--processes`` is given without PREFECT_API_URL (threads need none)."""
    if (
        not getattr(args, "processes", False)
        or args.dask_address
        or os.environ.get("PREFECT_API_URL")
    ):
        yield
        return
    from maskbank.flows.server import loopback_server

    with tempfile.TemporaryDirectory(prefix="maskbank-prefect-") as home:
        print("starting a loopback Prefect server for the worker processes...", file=sys.stderr)
        with loopback_server(home) as url:
            os.environ["PREFECT_API_URL"] = url
            try:
                yield
            finally:
                del os.environ["PREFECT_API_URL"]


def add_run_output_options(p: argparse.ArgumentParser) -> None:
    """``--json``, ``--no-progress`` and ``-v`` of the commands that run a flow."""
    p.add_argument("--json", action="store_true", help="print the report as JSON, not a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's INFO logs")


def add_scan_selection(p: argparse.ArgumentParser) -> None:
    """``--scans a,b``: a subset of the bank's scans (checked by `open_bank_scans`)."""
    p.add_argument("--scans", default=None, help="comma list of scan ids (default: all)")


def open_bank_scans(prog: str, bank: str, scans: str | None = None, mode: str = "r"):
    """``(Bank, scan ids or None for all)``, the bank opened in ``mode`` ("a": to write);
    on a usage error print why and return None (exit 2)."""
    from maskbank.bank import Bank
    from maskbank.bank.errors import BankError

    try:
        store = Bank.open(bank, mode=mode)
    except (BankError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None
    ids = [s.strip() for s in scans.split(",")] if scans else None
    unknown = [s for s in ids or [] if s not in store]
    if unknown:
        print(f"{prog}: error: scans not in the bank: {unknown}", file=sys.stderr)
        return None
    return store, ids


STORAGE_OPTIONS_FLAG = "--storage-options"


def add_storage_options(p: argparse.ArgumentParser) -> None:
    """``--storage-options JSON``: fsspec options of a bank on object storage (e.g. S3)."""
    p.add_argument(
        STORAGE_OPTIONS_FLAG,
        dest="storage_options",
        default=None,
        metavar="JSON",
        help='fsspec options for a bank URL, e.g. \'{"client_kwargs": {"endpoint_url": '
        '"http://127.0.0.1:9000"}}\' (default: $MASKBANK_STORAGE_OPTIONS); credentials '
        "best come from AWS_* variables or a profile (docs/bank-format.md, 'Object storage')",
    )


def apply_storage_options(args: argparse.Namespace) -> str | None:
    """Export ``--storage-options`` as MASKBANK_STORAGE_OPTIONS, which every bank opened in
    this process, its Dask worker processes and the trainer's workers read; an error
    message (the value is never echoed: it may hold keys) or None."""
    text = getattr(args, "storage_options", None)
    if text is None:
        return None
    from maskbank.bank.errors import BankError
    from maskbank.bank.storage_options import ENV_VAR as STORAGE_OPTIONS_ENV
    from maskbank.bank.storage_options import parse as parse_storage_options

    try:
        parse_storage_options(text)
    except BankError as exc:
        return str(exc)
    os.environ[STORAGE_OPTIONS_ENV] = text
    return None


def redacted_argv(argv: list[str]) -> list[str]:
    """argv fit for a report: ``--storage-options`` values with their credentials replaced."""
    if not any(a.startswith(STORAGE_OPTIONS_FLAG) for a in argv):
        return list(argv)  # no bank import for commands without the option
    from maskbank.bank.storage_options import redacted_json

    out, redact_next = [], False
    for arg in argv:
        if redact_next:
            out.append(redacted_json(arg))
            redact_next = False
        elif arg == STORAGE_OPTIONS_FLAG:
            out.append(arg)
            redact_next = True
        elif arg.startswith(STORAGE_OPTIONS_FLAG + "="):
            out.append(f"{STORAGE_OPTIONS_FLAG}={redacted_json(arg.split('=', 1)[1])}")
        else:
            out.append(arg)
    return out


def add_planning_options(p: argparse.ArgumentParser, rehash: bool = True) -> None:
    """``--batch N`` and (with ``rehash``) ``--rehash``: how a run plans and groups its work."""
    p.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        metavar="N",
        help="scans per Dask task (default: by estimated cost, tens of seconds of work "
        "each; every scan still gets its own outcome, retries and report row)",
    )
    if rehash:
        p.add_argument(
            "--rehash",
            action="store_true",
            help="compare the SHA-256 of every source with the bank's, not only of those "
            "whose size or modification time changed (a content change that keeps both "
            "is caught only this way; reads every file)",
        )
