"""Serve `prepare_bank` as a Prefect deployment from this process (no work pool needed).

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve --name maskbank
    prefect deployment run prepare-bank/maskbank \\
        --params '{"inputs": ["/data/scans"], "bank": "/data/bank", "workers": 8}'

Each triggered run executes in a fresh subprocess of this one, so the machine
running `serve` needs the data paths and the maskbank environment. For runs
picked up by workers of a work pool instead, see prefect.yaml and docs/deploy.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_NAME = "maskbank"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description="Register the prepare-bank deployment and run its flow runs until stopped.",
    )
    p.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default {DEFAULT_NAME})")
    p.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1)")
    p.add_argument("--workers", type=int, default=4, help="default Dask workers per run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.commands._prefect_env import apply_cli_defaults

    apply_cli_defaults()
    from flows.prepare import prepare_bank

    prepare_bank.serve(
        name=args.name,
        limit=args.limit,
        tags=["maskbank"],
        description="Prepare raw CT/MR/PET scans into a maskbank bank (one Dask task per scan).",
        parameters={"workers": args.workers, "progress": False},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
