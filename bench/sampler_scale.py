"""Sampler scale benchmark: what opening a bank and starting the pair stream cost at
100,000 scans, and the memory of each DataLoader worker.

Run:  .venv/bin/python bench/sampler_scale.py [--sizes 1000 100000] [--workers 2]
                                             [--batches 4] [--rounds 2] [--profile]
                                             [--set data.val_fraction=0.01 ...]
                                             [--json] [--keep DIR]

It builds a real bank of ``--real`` (8) phantom scans with proposals (`build_phantom_bank`,
the writers `maskbank prepare` and `maskbank propose` use), then, for each N of
``--sizes``, a simulated bank of N scans beside it: ``scans/<id>`` are symlinks to the
real scans' groups (round robin; a scan group holds no scan id, so nothing tells them
apart) and index.json holds N copies of the real rows, each with its own scan id, source
path, hash and a source record of the size `maskbank prepare` writes (about 700 bytes of
JSON a row, as a prepared bank's). The real bank itself is the baseline (N = 8).

For each bank, in this one process (smallest N first, in ``--rounds`` interleaved rounds;
the best of each figure is kept):

* open + list     ``Bank.open(BANK).scan_ids``
* scan table      ``Bank.open(BANK).scans`` (the pandas table of every scan)
* split, stream   what ``maskbank pretrain`` does before its first step, on the ``tiny``
                  config with ``data.num_workers=--workers`` (the Trainer's code path,
                  without the model): the validation split (``resolve_validation``), then
                  ``PairStream(..., compact=True)`` and ``make_loader``
* first batch     from ``iter(loader)`` to the first batch (the workers start, open the
                  bank and draw their first pairs)
* start-up        split + stream + first batch
* worker memory   RSS, USS and PSS of each worker process after ``--batches`` batches
                  (psutil; forked workers share the parent's pages, so USS -- pages only
                  that worker holds -- is what each extra worker costs)

then prints one table and each figure's ratio to the baseline's. ``--profile`` adds a
cProfile of the start-up at the largest N: the main process's part (stream) and a
worker's part (its first batch, run in this process with the bank not yet open).
Targets: open + list of 100k scans <= 2 s; start-up on 100k scans <= 10 s.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import psutil

from maskbank.bank import Bank
from maskbank.bank.index import atomic_write_text, parse_index, render_index
from maskbank.flows.demo_bank import build_phantom_bank
from maskbank.train.pair_sampler import PairStream, make_loader
from maskbank.train.run_config import DataConfig, TrainConfig
from maskbank.train.validation import resolve_validation

REAL_SHAPE = (80, 80, 64)
TIMES = ("open_list_s", "scan_table_s", "split_s", "stream_s", "first_batch_s", "startup_s")


def real_bank(root: Path, n_scans: int) -> Path:
    """A bank of ``n_scans`` phantoms with proposals (>= 13 each: the tiny config's k)."""
    build_phantom_bank(root, n_scans=n_scans, shape=REAL_SHAPE)
    bank = Bank.open(root, mode="a")
    bank.compact_index()  # the rows the writers published, folded into index.json
    return root


def simulated_row(row: dict, i: int) -> dict:
    """A copy of a real row as scan ``i`` of a prepared bank: its own id, source and hash,
    and the source record `maskbank prepare` writes (the size of a prepared bank's row)."""
    sid = f"sim-{i:06d}"
    return {
        **row,
        "scan_id": sid,
        "source_path": f"/data/cohort/{sid}/image.nii.gz",
        "source_sha256": f"{i:064x}",
        "source_stat": {
            "image": {"size": 10**7 + i, "mtime_ns": 1764000000000000000 + i},
            "label": None,
            "label_names": None,
            "row": f"{i:016x}",
        },
        "normalization": row.get("normalization") or {"clip": [-991.0, 500.0], "mean": -227.97},
    }


def simulated_bank(real: Path, root: Path, n: int) -> Path:
    """A bank of ``n`` scans: symlinks to ``real``'s scan groups and an index of copied rows."""
    Bank.create(root)
    rows_real = parse_index((real / "index.json").read_text(encoding="utf-8"))
    ids = sorted(rows_real)
    scans = root / "scans"
    rows = {}
    for i in range(n):
        src = rows_real[ids[i % len(ids)]]
        row = simulated_row(src, i)
        os.symlink((real / "scans" / src["scan_id"]).resolve(), scans / row["scan_id"])
        rows[row["scan_id"]] = row
    atomic_write_text(root / "index.json", render_index(rows))
    return root


def tiny_config(workers: int, overrides: list[str] = ()) -> TrainConfig:
    return TrainConfig.load("tiny", [f"data.num_workers={workers}", *overrides])


def worker_memory(pids: list[int]) -> list[dict]:
    """RSS/USS/PSS (MiB) of each worker process."""
    out = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        out.append({k: getattr(info, k) / 2**20 for k in ("rss", "uss", "pss")})
    return out


def split(root: Path, cfg: TrainConfig) -> DataConfig:
    """The Trainer's validation split: the data section the stream is built with."""
    train_scans, val_scans = resolve_validation(str(root), cfg.data)
    return replace(cfg.data, scans=train_scans) if val_scans else cfg.data


def start_stream(root: Path, cfg: TrainConfig, data: DataConfig) -> tuple[PairStream, object]:
    """What the Trainer does next, less the model: the stream and its loader."""
    stream = PairStream(str(root), data, seed=cfg.seed, compact=True)
    loader = make_loader(
        stream, data.num_workers, data.prefetch_factor, timeout=data.worker_timeout
    )
    return stream, loader


def measure_once(root: Path, cfg: TrainConfig, batches: int) -> dict:
    gc.collect()
    t0 = time.perf_counter()
    n = len(Bank.open(root).scan_ids)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert len(Bank.open(root).scans) == n
    t_table = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = split(root, cfg)
    t_split = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream, loader = start_stream(root, cfg, data)
    t_stream = time.perf_counter() - t0
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - t0
    for _ in range(batches - 1):
        next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    mem = worker_memory(pids)
    main_rss = psutil.Process().memory_info().rss / 2**20
    del it, loader, stream
    gc.collect()
    return {
        "scans": n,
        "open_list_s": t_open,
        "scan_table_s": t_table,
        "split_s": t_split,
        "stream_s": t_stream,
        "first_batch_s": t_first,
        "startup_s": t_split + t_stream + t_first,
        "workers": mem,
        "main_rss_mib": main_rss,
    }


def best(runs: list[dict]) -> dict:
    """Per figure, the smallest over the rounds (a shared machine only ever adds time)."""
    out = dict(runs[-1])
    for key in TIMES:
        out[key] = min(r[key] for r in runs)
    return out


def profile_startup(root: Path, cfg: TrainConfig, top: int = 18) -> str:
    """cProfile of the main process's start-up and of one worker's first batch."""
    text = io.StringIO()
    prof = cProfile.Profile()
    prof.enable()
    stream, _ = start_stream(root, cfg, split(root, cfg))
    prof.disable()
    text.write(f"--- main process: validation split and stream at {root.name}\n")
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    stream._bank = None  # as a worker finds it: the bank not yet open in this process
    prof = cProfile.Profile()
    prof.enable()
    stream.batch(0)
    prof.disable()
    text.write(f"--- a worker: first batch at {root.name}\n")
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def fmt_table(results: list[dict]) -> str:
    base = results[0]
    cols = [
        ("scans", "scans", "{:>8d}"),
        ("open_list_s", "open+list s", "{:>11.3f}"),
        ("scan_table_s", "scan table s", "{:>12.3f}"),
        ("split_s", "split s", "{:>7.3f}"),
        ("stream_s", "stream s", "{:>8.3f}"),
        ("first_batch_s", "1st batch s", "{:>11.3f}"),
        ("startup_s", "start-up s", "{:>10.3f}"),
    ]
    head = " | ".join(h.rjust(len(f.format(0 if k == "scans" else 0.0))) for k, h, f in cols)
    head += " | worker RSS/USS/PSS MiB (max over workers) | main RSS MiB"
    lines = [head, "-" * len(head)]
    for r in results:
        cells = [f.format(r[k]) for k, _, f in cols]
        w = r["workers"]
        mem = "/".join(f"{max(x[k] for x in w):.0f}" for k in ("rss", "uss", "pss")) if w else "-"
        lines.append(" | ".join(cells) + f" | {mem:>42} | {r['main_rss_mib']:>12.0f}")
    lines.append("")
    lines.append("ratios to the smallest bank:")
    for r in results[1:]:
        parts = [
            f"{k.removesuffix('_s')} x{r[k] / base[k]:.1f}" for k, _, _ in cols[1:] if base[k] > 0
        ]
        if r["workers"] and base["workers"]:
            uss = max(x["uss"] for x in r["workers"]) / max(x["uss"] for x in base["workers"])
            parts.append(f"worker USS x{uss:.2f}")
        lines.append(f"  {r['scans']:>8d} scans: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    p.add_argument("--real", type=int, default=8, help="real phantom scans (the baseline bank)")
    p.add_argument("--workers", type=int, default=2, help="data.num_workers")
    p.add_argument("--batches", type=int, default=4, help="batches drawn before memory is read")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best kept)")
    p.add_argument("--profile", action="store_true", help="cProfile start-up at the largest N")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more overrides of the tiny config, e.g. data.val_fraction=0.01",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    p.add_argument("--keep", type=Path, help="build the banks here (or reuse them) and keep them")
    args = p.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="sampler-scale-"))
    try:
        t0 = time.perf_counter()
        real, roots = work / f"bank-{args.real}", []
        for n in [args.real, *sorted(args.sizes)]:
            root = work / f"bank-{n}"
            if (root / "zarr.json").exists():  # --keep: banks built before are reused
                pass
            elif n == args.real:
                real_bank(root, n)
            else:
                simulated_bank(real, root, n)
            roots.append(root)
        print(f"banks built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        cfg = tiny_config(args.workers, args.set)
        runs: list[list[dict]] = [[] for _ in roots]
        for _ in range(args.rounds):
            for i, root in enumerate(roots):
                runs[i].append(measure_once(root, cfg, args.batches))
        results = [best(r) for r in runs]
        load = os.getloadavg()
        print(fmt_table(results))
        print(
            f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} "
            f"cores; tiny config, data.num_workers={args.workers} {' '.join(args.set)}, "
            f"best of {args.rounds}"
        )
        if args.profile:
            print(profile_startup(roots[-1], tiny_config(0, args.set)))
        if args.json:  # one line, the last
            print(json.dumps({"load": load, "workers": args.workers, "results": results}))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
