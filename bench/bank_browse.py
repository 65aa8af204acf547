"""Seconds to open a bank of many scans, list them as a table, and list one scan's proposals.

    python bench/bank_browse.py [--scans 1000] [--bank PATH_OR_URL] [--record]

What a notebook user does first: ``Bank.open(uri)``, ``bank.scans`` (a DataFrame, one
row a scan) and ``bank.proposal_table(scan_id)``. The bank answers the first two from its
index alone, so their cost must not grow with what the scans hold. Baseline, in the
same process: listing the same table by opening every scan's group and reading its
attributes (what a reader without an index has to do). Without --bank a bank of small
phantom scans is built once into --cache-dir (a few minutes for 1,000 scans).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from maskbank.bank import Bank  # noqa: E402

SHAPE = (24, 24, 20)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "maskbank" / "bench-bank-browse"


def cached_bank(cache: Path, n_scans: int) -> str:
    """A bank of ``n_scans`` small phantoms with proposals, built once."""
    from maskbank.flows.demo_bank import add_phantom_scan

    path = cache / f"bank-{n_scans}"
    bank = Bank.create(path)
    have = set(bank.scan_ids)
    modalities = ("ct", "mr", "pet")
    todo = [i for i in range(n_scans) if f"scan-{i:05d}" not in have]
    if todo:
        print(f"building {len(todo)} scans into {path} ...", file=sys.stderr)
    for i in todo:
        add_phantom_scan(bank, f"scan-{i:05d}", modalities[i % 3], SHAPE, seed=i, n_lesions=1)
    return str(path)


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(location: str, repeat: int, storage_options: dict | None = None) -> dict:
    opened = {}

    def open_bank():
        opened["bank"] = Bank.open(location, storage_options=storage_options)

    t_open = _median_time(open_bank, repeat)
    bank = opened["bank"]
    t_scans = _median_time(lambda: bank.scans, repeat)
    sid = bank.scan_ids[len(bank) // 2]
    t_props = _median_time(lambda: bank.proposal_table(sid), repeat)

    def naive():  # no index: open every scan's group and read its attributes
        return [dict(bank.scan(s).attrs) for s in bank.scan_ids]

    t_naive = _median_time(naive, 1)
    first = t_open + t_scans + t_props
    return {
        "location": location,
        "scans": len(bank),
        "open_s": t_open,
        "scans_table_s": t_scans,
        "one_scan_proposals_s": t_props,
        "open_list_propose_s": first,
        "baseline_open_every_scan_s": t_naive,
        "ratio": t_naive / max(t_scans, 1e-9),
        "proposals_in_that_scan": int(bank.row(sid)["n_proposals"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", help="an existing bank (path or URL); default: a cached phantom bank")
    p.add_argument("--scans", type=int, default=1000, help="scans of the built bank (default 1000)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--repeat", type=int, default=5, help="runs per figure; the median is shown")
    p.add_argument("--storage-options", default=None, help="JSON for fsspec (e.g. an endpoint)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = p.parse_args(argv)
    location = args.bank or cached_bank(args.cache_dir or default_cache_dir(), args.scans)
    options = json.loads(args.storage_options) if args.storage_options else None
    result = measure(location, args.repeat, options)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['scans']} scans at {location}: open {result['open_s'] * 1e3:.0f} ms, "
            f"scan table {result['scans_table_s'] * 1e3:.0f} ms, one scan's "
            f"{result['proposals_in_that_scan']} proposals {result['one_scan_proposals_s'] * 1e3:.0f}"
            f" ms; all three {result['open_list_propose_s']:.2f} s. Without the index (open "
            f"every scan): {result['baseline_open_every_scan_s']:.1f} s = {result['ratio']:.0f}x "
            "the scan table"
        )
    if args.record:
        from record import record

        keys = ("scans", "open_s", "scans_table_s", "one_scan_proposals_s", "ratio")
        record("Bank browsing", {k: result[k] for k in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())
