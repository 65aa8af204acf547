"""Index scale benchmark: what opening, publishing into and compacting a local bank's
index costs at 1,000 and at 100,000 scans.

Run:  .venv/bin/python bench/index_scale.py [--sizes 1000 100000] [--publishes 1200]
                                           [--old 20] [--json] [--out DIR]

For each N it makes a bank whose index.json holds N simulated rows (the shape of
`bank.index.make_row`, with a prepared scan's attributes; no arrays), then measures in
this process, the smallest N first as the baseline:

* open + list       ``Bank.open(BANK).scan_ids``, with no pending row files and with
                    as many as a writer lets pile up (`index_rows.pending_bound(N)`)
* publish           one scan's row through the writer's own path (its row file under
                    its scan lock, then the writer's amortised fold check), over
                    ``--publishes`` rewrites of distinct scans: median and mean (the
                    mean includes the folds the writers did on the way)
* compaction        folding 1,024 pending rows into index.json
* old publish       what publishing cost before row files: index.json rewritten (one
                    line swapped) under the bank-wide index lock, ``--old`` times

and prints one table with the ratio of each figure to the smallest N's. Targets:
publishing into 100k rows <= 2x into 1k; open + list of 100k <= 2 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from maskbank.bank import Bank, index_rows
from maskbank.bank.index import atomic_write_text, make_row, render_index, update_index_text
from maskbank.bank.locks import file_lock
from maskbank.bank.publish import index_lock_path

FOLD_ROWS = 1000


def fake_row(i: int, rng: random.Random) -> dict:
    """A row as `maskbank prepare` writes it (about 700 bytes of JSON)."""
    sid = f"scan-{i:06d}"
    attrs = {
        "dataset": "chest-ct",
        "modality": "ct",
        "spacing": [1.5, 1.5, 1.5],
        "source_path": f"/data/cohort/{sid}/image.nii.gz",
        "source_sha256": f"{rng.getrandbits(256):064x}",
        "config_fingerprint": f"{rng.getrandbits(64):016x}",
        "normalization": {"clip": [-991.0, 500.0], "mean": -227.97, "std": 379.11},
        "source_stat": {
            "image": {"size": rng.randrange(10**7, 10**8), "mtime_ns": 1764000000000000000 + i},
            "label": None,
            "label_names": None,
            "row": f"{rng.getrandbits(64):016x}",
        },
        "maskbank": {
            "arrays": {"image": {"shape": [194, 151, 160]}, "label": {"shape": [194, 151, 160]}},
            "written_at": "2026-12-07T13:56:43.911298Z",
        },
    }
    proposals = {"maskbank": {"n_proposals": 15996}}
    sets = {"default": (proposals, 2876768)}
    return make_row(sid, attrs, proposals, 8186794, 2876768, sets)


def make_bank(root: Path, n: int) -> list[str]:
    """A bank whose index.json lists ``n`` rows (no scan groups); returns the scan ids."""
    Bank.create(root)
    rng = random.Random(n)
    rows = {}
    for i in range(n):
        row = fake_row(i, rng)
        rows[row["scan_id"]] = row
    atomic_write_text(root / "index.json", render_index(rows))
    return sorted(rows)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def open_list(root: Path) -> int:
    return len(Bank.open(root).scan_ids)


def publish_rows(bank: Bank, ids: list[str], rng: random.Random) -> list[float]:
    """Rewrite the rows of distinct scans one by one, as writers do; seconds per publish."""
    backend = bank._backend
    times = []
    for sid in ids:
        row = dict(backend.rows[sid], nbytes=rng.randrange(10**6, 10**7))
        t0 = time.perf_counter()
        with bank.scan_lock(sid):
            backend.publish_row(sid, row)
        backend._compact_if_due()
        times.append(time.perf_counter() - t0)
    return times


def old_publish(root: Path, sid: str, row: dict) -> None:
    """The publish this replaces: index.json rewritten under the bank-wide lock."""
    with file_lock(index_lock_path(root)):
        text = (root / "index.json").read_text(encoding="utf-8")
        atomic_write_text(root / "index.json", update_index_text(text, sid, row))


def measure(work: Path, sizes: list[int], publishes: int, old: int, rounds: int = 6) -> list[dict]:
    """Every figure for every size, taken in interleaved rounds (smallest N first in each),
    so that the load of a shared machine moves all sizes alike."""
    rng = random.Random(1)
    roots = {n: work / f"bank-{n}" for n in sizes}
    ids = {n: make_bank(roots[n], n) for n in sizes}
    out = {n: {"n": n, "index_mb": (roots[n] / "index.json").stat().st_size / 2**20} for n in sizes}

    def each(fn, repeat: int = rounds) -> dict[int, list]:
        got: dict[int, list] = {n: [] for n in sizes}
        for _ in range(repeat):
            for n in sizes:
                got[n] += fn(n)
        return got

    for n in sizes:
        open_list(roots[n])  # warm the page cache and the imports alike for every size
    for n, times in each(lambda n: timed(lambda: open_list(roots[n]), 1)).items():
        out[n]["open_list_s"] = statistics.median(times)
    for n in sizes:  # as many row files as a writer lets pile up
        out[n]["pending_bound"] = bound = index_rows.pending_bound(n)
        publish_rows(Bank.open(roots[n], mode="a"), rng.sample(ids[n], bound), rng)
        out[n]["pending_at_open"] = index_rows.count_pending(roots[n])
    for n, times in each(lambda n: timed(lambda: open_list(roots[n]), 1)).items():
        out[n]["open_list_pending_s"] = statistics.median(times)
    banks = {n: Bank.open(roots[n], mode="a") for n in sizes}
    for bank in banks.values():
        bank.compact_index()
    todo = {n: itertools.cycle(rng.sample(ids[n], min(publishes, n))) for n in sizes}
    per_round = max(1, publishes // rounds)
    times = each(lambda n: publish_rows(banks[n], [next(todo[n]) for _ in range(per_round)], rng))
    for n in sizes:
        out[n]["publish_median_ms"] = 1e3 * statistics.median(times[n])
        out[n]["publish_mean_ms"] = 1e3 * statistics.fmean(times[n])
        out[n]["publish_max_ms"] = 1e3 * max(times[n])
        out[n]["publishes"] = len(times[n])
    for n in sizes:
        banks[n].compact_index()
        with index_rows_bound(10**9):  # let them pile up: the fold is timed on its own
            publish_rows(banks[n], rng.sample(ids[n], min(FOLD_ROWS, n)), rng)
        t0 = time.perf_counter()
        out[n]["compact_rows"] = banks[n].compact_index()
        out[n]["compact_s"] = time.perf_counter() - t0
    if old:

        def old_round(n: int) -> list[float]:
            sid = rng.choice(ids[n])
            row = dict(banks[n]._backend.rows[sid], nbytes=rng.randrange(10**6, 10**7))
            return timed(lambda: old_publish(roots[n], sid, row), 1)

        for n, t in each(old_round, old).items():
            out[n]["old_publish_median_ms"] = 1e3 * statistics.median(t)
    for n in sizes:
        assert open_list(roots[n]) == n
    return [out[n] for n in sizes]


class index_rows_bound:  # noqa: N801 (used as a context manager, reads as a phrase)
    """Writers' fold bound replaced for a while (to pile rows up for the fold's timing)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound

    def __enter__(self) -> None:
        self.saved = index_rows.pending_bound
        index_rows.pending_bound = lambda indexed: self.bound

    def __exit__(self, *exc: object) -> None:
        index_rows.pending_bound = self.saved


ROWS = [
    ("index.json MB", "index_mb", "{:.1f}"),
    ("open + list s (no row files)", "open_list_s", "{:.3f}"),
    ("open + list s (pending rows at the bound)", "open_list_pending_s", "{:.3f}"),
    ("pending-row bound", "pending_bound", "{:d}"),
    ("publish ms, median", "publish_median_ms", "{:.2f}"),
    ("publish ms, mean (folds included)", "publish_mean_ms", "{:.2f}"),
    ("publish ms, max (a fold)", "publish_max_ms", "{:.1f}"),
    (f"compaction s ({FOLD_ROWS} rows)", "compact_s", "{:.3f}"),
    ("old publish ms, median (index.json rewritten)", "old_publish_median_ms", "{:.1f}"),
]


def table(results: list[dict]) -> str:
    base = results[0]
    head = ["figure"] + [f"N = {r['n']:,}" for r in results]
    head += [f"ratio {r['n']:,} / {base['n']:,}" for r in results[1:]]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label, key, fmt in ROWS:
        if key not in base:
            continue
        cells = [fmt.format(r[key]) for r in results]
        cells += [f"{r[key] / base[key]:.2f}" if base[key] else "-" for r in results[1:]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    p.add_argument("--publishes", type=int, default=1200, help="rows published per size")
    p.add_argument("--old", type=int, default=20, help="old-style publishes per size (0: skip)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--out", type=Path, help="keep the banks here instead of a temp dir")
    args = p.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="index-scale-"))
    try:
        results = measure(work, sorted(args.sizes), args.publishes, args.old)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"results": results}, indent=1) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
