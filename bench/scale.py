"""Scale benchmark: what a bank of N small scans costs to build, re-run, grow and read.

Run:  .venv/bin/python bench/scale.py --sizes 300 1000 3000 [--workers 2] [--json]
                                      [--out DIR] [--keep]

For each N it synthesises N small CT phantoms (48x48x40 voxels at 1.5 mm, int16, ~100 KB
each, like pipeline/phantom.py makes), then runs the real CLI, as a user would, in
subprocesses that report to one Prefect server on loopback started here (as on a
cluster; each command would otherwise start its own temporary server):

* first prepare       ``maskbank prepare SRC --bank BANK --workers W``
* re-run, all done    the same command again
* grown by 1 %        N/100 new scans added to SRC, the same command (must prepare
                      exactly those)
* propose             ``maskbank propose BANK --generators supervoxels --scales 40
                      --max-proposals 30``
* propose re-run      the same command again, all up to date
* verify              ``maskbank verify BANK`` (a deep check: every chunk decoded)
* open + list         ``Bank.open(BANK).scans`` in this process
* sampler first batch the `tiny` config's pair stream on BANK, from its start to its first
                      batch, in this process (scans without proposals are left out, as
                      pretraining leaves them out)

and prints one table per N: wall seconds (command start to exit, Python start-up
included) and the flow's own seconds (from its report), ms per scan, the driver's peak
RSS (the command's process; with thread workers the scans run inside it too), Prefect
task runs and database growth per step, and files per scan in the bank. Ratios in one
run: re-run / first prepare, grown / first prepare, propose re-run / propose. With
several sizes it ends with the per-scan cost at the largest N / at the smallest
(linear: <= 1.2). This is a benchmark, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPE = (48, 48, 40)
SPACING = (1.5, 1.5, 1.5)
PROPOSE = ["--generators", "supervoxels", "--scales", "40", "--max-proposals", "30"]


def synthesise(folder: Path, start: int, stop: int) -> None:
    """Phantoms ``scan-{start:06d}`` .. ``scan-{stop-1:06d}`` (image only), seeded by index."""
    from maskbank.pipeline.phantom import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        ph = make_phantom("ct", shape=SHAPE, spacing=SPACING, seed=i)
        data = np.round(ph.image).astype(np.int16)
        nib.save(nib.Nifti1Image(data, ph.affine), folder / f"scan-{i:06d}.nii.gz")


def run_cli(args: list[str], env: dict) -> dict:
    """One ``maskbank`` command: wall seconds, the process's peak RSS, its JSON report."""
    flags = ["--json", "--no-progress"] if args[0] in ("prepare", "propose") else []
    cmd = [str(REPO / ".venv" / "bin" / "maskbank"), *args, *flags]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(), err.read().decode()
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{errors[-3000:]}")
    report = json.loads(text) if text.strip().startswith("{") else {}
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "report": report}


def db_state(home: Path, settle_s: float = 3.0) -> tuple[int, int]:
    """(bytes of the Prefect database's pages, task runs recorded), once the server's
    task-run recorder has caught up (the count is stable for ``settle_s``)."""
    last, size, runs = None, 0, -1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            con = sqlite3.connect(home / "prefect.db", timeout=30)
            try:
                runs = con.execute("select count(*) from task_run").fetchone()[0]
                pages = con.execute("pragma page_count").fetchone()[0]
                free = con.execute("pragma freelist_count").fetchone()[0]
                size = (pages - free) * con.execute("pragma page_size").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            return 0, -1
        if runs == last:
            break
        last = runs
        time.sleep(settle_s)
    return size, runs


def files_in(folder: Path) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(folder))


def bench_size(
    n: int, workers: int, root: Path, env: dict, home: Path, propose_max: int | None
) -> dict:
    src, bank = root / f"src-{n}", root / f"bank-{n}"
    grow = max(1, n // 100)
    t0 = time.perf_counter()
    synthesise(src, 0, n)
    synth_s = time.perf_counter() - t0
    prepare = ["prepare", str(src), "--bank", str(bank), "--workers", str(workers)]
    propose = ["propose", str(bank), "--workers", str(workers), *PROPOSE]
    n_propose = n + grow if propose_max is None else min(propose_max, n + grow)
    if n_propose < n + grow:  # the first scans only: proposals cost ~100x a prepare
        propose += ["--scans", ",".join(f"scan-{i:06d}" for i in range(n_propose))]
    steps: dict[str, dict] = {}

    def step(name: str, args: list[str]) -> dict:
        size0, runs0 = db_state(home)
        res = run_cli(args, env)
        size1, runs1 = db_state(home)
        rep = res.pop("report")
        res.update(
            flow_s=rep.get("seconds"),
            counts=rep.get("counts"),
            db_growth_kb=(size1 - size0) / 1024,
            task_runs=runs1 - runs0,
        )
        steps[name] = res
        return rep

    step("first prepare", prepare)
    step("re-run, all done", prepare)
    synthesise(src, n, n + grow)
    grown = step(f"grown by 1 % (+{grow})", prepare)
    made = sorted(r["scan_id"] for r in grown.get("scans", []) if r["status"] == "ok")
    exactly_new = made == [f"scan-{i:06d}" for i in range(n, n + grow)]
    step("propose", propose)
    step("propose re-run", propose)
    step("verify", ["verify", str(bank)])

    from maskbank.bank import Bank

    t = time.perf_counter()
    listed = len(Bank.open(bank).scans)
    open_list_s = time.perf_counter() - t
    first_batch_s, sampled = first_batch(bank, env)
    return {
        "n": n,
        "scans": n + grow,
        "synthesis_s": synth_s,
        "steps": steps,
        "grown_prepared_exactly_the_new": exactly_new,
        "open_list_s": open_list_s,
        "first_batch_s": first_batch_s,
        "sampled_scans": sampled,
        "listed": listed,
        "files_per_scan": files_in(bank / "scans") / max(1, listed),
        "workers": workers,
        "proposed": n_propose,
    }


FIRST_BATCH = """
import json, sys, time
from maskbank.train.pair_sampler import PairStream
from maskbank.train.run_config import TrainConfig
cfg = TrainConfig.load("tiny").data
t = time.perf_counter()
stream = PairStream(sys.argv[1], cfg, seed=0, compact=True)
stream.batch(0)
print(json.dumps([time.perf_counter() - t, len(stream.scan_ids)]))
"""


def first_batch(bank: Path, env: dict) -> tuple[float, int]:
    """Seconds from opening the `tiny` config's pair stream on ``bank`` to its first batch,
    and how many scans it samples from (those with enough proposals). In a process of its
    own: torch loaded here would count in the peak RSS of every later command (a child
    reports the high-water mark of its pages from before it exec'd)."""
    cmd = [sys.executable, "-c", FIRST_BATCH, str(bank)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=REPO)
    seconds, scans = json.loads(out.stdout.strip().splitlines()[-1])
    return float(seconds), int(scans)


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{100 * a / b:.1f} %"


def print_table(res: dict) -> None:
    n, s = res["n"], res["steps"]
    print(
        f"\n## N = {n} ({res['workers']} workers; {res['scans']} scans after growing; "
        f"proposals for {res['proposed']} of them)\n"
    )
    print(
        "| step | wall s | flow s | ms/scan (wall) | counts | peak RSS MB | task runs | Prefect DB +KB |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, r in s.items():
        counts = r["counts"] or {}
        c = "/".join(str(counts.get(k, 0)) for k in ("ok", "skipped", "failed")) if counts else ""
        flow = "-" if r["flow_s"] is None else f"{r['flow_s']:.1f}"
        per = 1000 * r["wall_s"] / (res["proposed"] if "propose" in name else n)
        print(
            f"| {name} | {r['wall_s']:.1f} | {flow} | {per:.1f} | {c} | "
            f"{r['peak_rss_mb']:.0f} | {r['task_runs']} | {r['db_growth_kb']:.0f} |"
        )
    print(f"| open + list ({res['listed']} scans) | {res['open_list_s']:.2f} | | | | | | |")
    print(
        f"| sampler's first batch ({res['sampled_scans']} scans with proposals) | "
        f"{res['first_batch_s']:.2f} | | | | | | |"
    )
    first, names = s["first prepare"], list(s)
    grown = s[names[2]]
    print(
        f"\nre-run all done / first prepare: {ratio(s['re-run, all done']['wall_s'], first['wall_s'])}"
        f" (flow {ratio(s['re-run, all done']['flow_s'], first['flow_s'])}); "
        f"grown / first: {ratio(grown['wall_s'], first['wall_s'])}"
        f" (flow {ratio(grown['flow_s'], first['flow_s'])}), prepared exactly the new scans: "
        f"{res['grown_prepared_exactly_the_new']}; propose re-run / propose: "
        f"{ratio(s['propose re-run']['wall_s'], s['propose']['wall_s'])}"
        f" (flow {ratio(s['propose re-run']['flow_s'], s['propose']['flow_s'])}); "
        f"files per scan {res['files_per_scan']:.1f}; "
        f"Prefect DB per 1,000 scans prepared: "
        f"{1000 * first['db_growth_kb'] / n:.0f} KB"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 3000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--propose-max",
        type=int,
        default=None,
        metavar="K",
        help="make proposals for the first K scans only (default: all)",
    )
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scans and banks")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="maskbank-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    home = root / "prefect"
    from maskbank.flows.server import LoopbackServer

    # with its services: the task-run recorder writes task runs to the database
    server = LoopbackServer(home, services=True).start()
    results = []
    try:
        url = server.wait(timeout=240)
        env = {
            **os.environ,
            "PREFECT_API_URL": url,
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        for n in args.sizes:
            res = bench_size(n, args.workers, root, env, home, args.propose_max)
            results.append(res)
            print_table(res)
            sys.stdout.flush()
    finally:
        server.stop()
        if not args.keep and args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    if len(results) > 1:
        small, large = results[0], results[-1]
        for step in ("first prepare", "propose"):
            a = small["steps"][step]["wall_s"] / small["proposed" if step == "propose" else "n"]
            b = large["steps"][step]["wall_s"] / large["proposed" if step == "propose" else "n"]
            print(
                f"\nper-scan cost of {step} at N = {large['n']} / at N = {small['n']}: "
                f"{b / a:.2f} (linear: <= 1.2)"
            )
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
