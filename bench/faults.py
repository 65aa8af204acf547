"""Fault injection: kill, race, fill and corrupt maskbank's writers at random (seeded) points,
recover as a user would, and count what was lost or damaged.

Run:  .venv/bin/python bench/faults.py --trials 3 [--json] [--out DIR] [--faults a,b,...]
                                       [--seed 0] [--real]

The single-case tests (tests/flows/test_kill_resume.py, test_concurrent_writers.py,
test_hostile_inputs.py, tests/train/test_run*.py) pin one interleaving each; this suite
draws the moment of the fault at random, many times, with the real CLI in real processes
(`maskbank` subprocesses talk to one loopback Prefect server started here).

A trial *survived* when, after the user's recovery (re-run, `--resume`, `maskbank verify
--repair`), the bank verifies (`Bank.open(path).verify() == []`), every input scan is there
exactly once with its source's SHA-256 and the same array checksums as an undisturbed
reference build, no staging or trash entry is left, proposals (where made) belong to the
current scan version, and a resumed training run ends with the weights (model and EMA) of an
uninterrupted one. `recover_s` is the median time from the fault to that verified state
(over the trials that reached it; none when no trial did).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # two processes racing: no oversubscription

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

from maskbank.bank import Bank, index_rows  # noqa: E402
from maskbank.bank.layout import STAGING_DIR, TRASH_DIR  # noqa: E402
from maskbank.pipeline.phantom import make_phantom  # noqa: E402
from maskbank.pipeline.reader import sha256_of  # noqa: E402

N_PHANTOMS = 4
PHANTOM_SHAPE = (72, 72, 56)  # ~1 s per scan on one core: a kill lands between and inside scans
SPACING = "1.5"
PROPOSE_OPTS = ["--scales", "600", "--max-proposals", "400"]
TRAIN_STEPS, TRAIN_CKPT_EVERY = 8, 2
TRAIN_KEYS = [
    f"max_steps={TRAIN_STEPS}",
    f"train.ckpt_every={TRAIN_CKPT_EVERY}",
    "train.keep_last=0",
    "train.progress=false",
    "train.tensorboard=false",
]
RSS_BOUND_KIB = 2 << 20  # 2 GiB: the gzip bomb alone decompresses to 2.5 GiB
FAULTS = (
    "kill-prepare",
    "kill-propose",
    "kill-train",
    "concurrent-prepare",
    "propose-vs-prepare",
    "disk-full",
    "corrupt-shard",
    "corrupt-index",
    "corrupt-row",
    "corrupt-checkpoint",
    "hostile-files",
)


@dataclass
class Trial:
    """One fault, injected once, and what the user's recovery left."""

    survived: bool
    scans_lost: int = 0
    scans_damaged: int = 0
    recover_s: float | None = None
    problems: list[str] = field(default_factory=list)


class Skip(Exception):  # noqa: N818 (not an error: the fault cannot be staged here)
    """This fault cannot be injected in this environment (the reason is reported)."""


def published(bank: Path, part: str = "") -> int:
    """Scans (or scan parts) already published: the progress a kill interrupts."""
    scans = bank / "scans"
    if not scans.is_dir():
        return 0
    return sum((p / part / "zarr.json").exists() for p in scans.iterdir())


class Suite:
    """Inputs, the loopback Prefect server, and undisturbed reference results, built once."""

    def __init__(self, root: Path, seed: int, real: bool) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.real = real
        self.inputs = root / "inputs"
        self._server = None
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PYTHONIOENCODING": "utf-8",
            "PREFECT_HOME": str(root / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        self.env.pop("PREFECT_API_KEY", None)
        self._n = 0

    # ------------------------------------------------------------------ plumbing
    def tmp(self, name: str) -> Path:
        self._n += 1
        path = self.root / f"{name}-{self._n}"
        path.mkdir(parents=True)
        return path

    def start_server(self) -> None:
        """One `prefect server start` on loopback for every maskbank subprocess."""
        if self._server is not None:
            return
        from maskbank.flows.server import LoopbackServer

        os.environ["PREFECT_HOME"] = self.env["PREFECT_HOME"]
        self._server = LoopbackServer(self.root / "prefect" / "server", services=False).start()
        self.env["PREFECT_API_URL"] = self._server.wait(timeout=240)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def popen(self, cmd: list[str]) -> subprocess.Popen:
        """A process group of its own, so a kill takes its workers too (as a node loss does)."""
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )

    def run(self, cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd,
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
        )

    @staticmethod
    def maskbank(*args: str) -> list[str]:
        return [sys.executable, "-m", "maskbank.flows.cli", *args]

    def prepare_cmd(self, bank: Path, inputs: Path | None = None) -> list[str]:
        return self.maskbank(
            "prepare",
            str(inputs or self.inputs),
            "--bank",
            str(bank),
            "--spacing",
            SPACING,
            "--workers",
            "1",
            "--no-progress",
        )

    def propose_cmd(self, bank: Path) -> list[str]:
        return self.maskbank("propose", str(bank), *PROPOSE_OPTS, "--workers", "1", "--no-progress")

    @staticmethod
    def train_cmd(bank: Path, out: Path, *flags: str) -> list[str]:
        return [sys.executable, str(REPO / "train" / "run.py"), *flags, "--config", "tiny",
                "--bank", str(bank), "--out", str(out), *TRAIN_KEYS]  # fmt: skip

    def timed(self, cmd: list[str], first: Callable[[], bool]) -> tuple[float, float]:
        """Run to the end; return (seconds in all, seconds until `first()` held).

        The pair bounds the random kill moments: from about the first unit of work
        (a published scan, a logged step) to the end of the run.
        """
        t0 = time.monotonic()
        proc = self.popen(cmd)
        t_first = None
        while proc.poll() is None:
            if t_first is None and first():
                t_first = time.monotonic() - t0
            time.sleep(0.02)
        out = proc.stdout.read() if proc.stdout else ""
        total = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"reference run failed ({proc.returncode}): {cmd}\n{out[-3000:]}")
        return total, t_first if t_first is not None else total / 2

    def kill_at(self, cmd: list[str], window: tuple[float, float]) -> tuple[float, int | None]:
        """SIGKILL the run's process group at a random moment in `window`; return
        (monotonic time of the kill, the run's exit code if it ended before)."""
        delay = self.rng.uniform(*window)
        proc = self.popen(cmd)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < delay:
            time.sleep(0.01)
        ended = proc.poll()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        t_fault = time.monotonic()
        proc.wait(timeout=60)
        if proc.stdout:
            proc.stdout.close()
        return t_fault, ended

    # ------------------------------------------------------------------ inputs and references
    @functools.cached_property
    def corpus(self) -> Path:
        """Phantom NIfTIs (+ labels), and with --real two of the real sample scans."""
        modalities = ("ct", "mr", "pet", "ct")
        for i in range(N_PHANTOMS):
            ph = make_phantom(
                modalities[i % 4], shape=PHANTOM_SHAPE, spacing=(1.5, 1.5, 1.5), seed=i
            )
            ph.save_nifti(self.inputs, f"phantom{i}")
        if self.real:
            if not (DATA / "SOURCES.md").exists():
                raise SystemExit(f"--real: no sample scans at {DATA}")
            for name in ("ct_chest_lung1", "ct_chest_lung1_nodule_label", "mr_brain_aniso_4x4x5mm"):
                shutil.copyfile(DATA / f"{name}.nii.gz", self.inputs / f"{name}.nii.gz")
        return self.inputs

    @functools.cached_property
    def prepared(self) -> dict:
        """An undisturbed prepare of the corpus: its bank, timing and per-scan truth."""
        self.corpus  # noqa: B018 (build the inputs)
        self.start_server()
        bank = self.tmp("ref-prepared") / "bank"
        total, first = self.timed(self.prepare_cmd(bank), lambda: published(bank) > 0)
        ref = Bank.open(bank)
        truth = {}
        for sid in ref.scan_ids:
            attrs = ref.scan(sid).attrs
            truth[sid] = {
                "sha256": sha256_of(Path(attrs["source_path"])),
                "crc": {k: v["crc32"] for k, v in attrs["maskbank"]["arrays"].items()},
            }
        return {"bank": bank, "window": (0.5 * first, total), "truth": truth}

    @functools.cached_property
    def proposed(self) -> dict:
        """The reference bank with proposals (a copy, proposed undisturbed)."""
        bank = self.tmp("ref-proposed") / "bank"
        shutil.copytree(self.prepared["bank"], bank)
        total, first = self.timed(self.propose_cmd(bank), lambda: published(bank, "proposals") > 0)
        return {"bank": bank, "window": (0.5 * first, total)}

    @functools.cached_property
    def trained(self) -> dict:
        """An uninterrupted tiny training run on the proposed reference bank (all checkpoints)."""
        out = self.tmp("ref-train") / "run"
        metrics = out / "metrics.jsonl"
        cmd = self.train_cmd(self.proposed["bank"], out)
        total, first = self.timed(cmd, lambda: metrics.exists() and metrics.stat().st_size > 0)
        return {"out": out, "window": (0.8 * first, total)}

    # ------------------------------------------------------------------ checks
    def check(self, bank: Path, proposals: bool = False, sources: dict | None = None) -> Trial:
        """Everything the suite promises about a bank after recovery, as one Trial."""
        truth = self.prepared["truth"]
        sources = sources or {}
        try:
            opened = Bank.open(bank)
            problems = opened.verify()
        except Exception as exc:  # an unopenable bank loses every scan
            return Trial(False, len(truth), 0, None, [f"cannot open bank: {exc}"])
        ids = set(opened.scan_ids)
        on_disk = {p.name for p in (bank / "scans").iterdir() if p.is_dir()}
        lost = sorted(set(truth) - ids)
        problems += [f"{sid}: lost" for sid in lost]
        problems += [f"{sid}: not an input scan" for sid in sorted(ids - set(truth))]
        if on_disk != ids:
            problems.append(f"scan folders {sorted(on_disk)} != index {sorted(ids)}")
        for sub in (STAGING_DIR, TRASH_DIR):
            left = sorted(p.name for p in (bank / sub).iterdir()) if (bank / sub).is_dir() else []
            problems += [f"left half-written: {sub}/{name}" for name in left]
        damaged = set()
        for sid in sorted(ids & set(truth)):
            scan = opened.scan(sid)
            attrs = scan.attrs
            want_sha = sources.get(sid, truth[sid]["sha256"])
            if attrs.get("source_sha256") != want_sha:
                damaged.add(sid)
                problems.append(f"{sid}: source_sha256 is not its input's")
            crc = {k: v["crc32"] for k, v in attrs["maskbank"]["arrays"].items()}
            if sid not in sources and crc != truth[sid]["crc"]:
                damaged.add(sid)
                problems.append(f"{sid}: array checksums differ from the reference build")
            if any(p.startswith(f"{sid}:") for p in problems):
                damaged.add(sid)
            if proposals:
                pattrs = scan.proposals_attrs
                if not pattrs:
                    problems.append(f"{sid}: no proposals")
                    damaged.add(sid)
                elif pattrs["maskbank"].get("scan_token") != scan.token:
                    problems.append(f"{sid}: proposals of another scan version")
                    damaged.add(sid)
        return Trial(not problems, len(lost), len(damaged), None, problems)

    def finish(self, trial: Trial, t_fault: float, *notes: str) -> Trial:
        trial.recover_s = round(time.monotonic() - t_fault, 2)
        trial.problems = [*notes, *trial.problems]
        trial.survived = trial.survived and not notes
        return trial

    def must(
        self, proc: subprocess.CompletedProcess, what: str, codes: tuple[int, ...] = (0,)
    ) -> list[str]:
        """A recovery step that failed, as a problem line (empty when it did its job)."""
        if proc.returncode in codes:
            return []
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        if "Traceback (most recent call last):" in lines:
            return [f"{what} exited {proc.returncode} with a traceback: {lines[-1]}"]
        return [f"{what} exited {proc.returncode}: " + " | ".join(lines[-4:])]


# ---------------------------------------------------------------------- faults
def kill_prepare(s: Suite) -> Trial:
    """SIGKILL a `maskbank prepare` mid-run, then run it again."""
    bank = s.tmp("kill-prepare") / "bank"
    t_fault, ended = s.kill_at(s.prepare_cmd(bank), s.prepared["window"])
    notes = s.must(s.run(s.prepare_cmd(bank)), "re-run of prepare")
    return s.finish(s.check(bank), t_fault, *notes)


def kill_propose(s: Suite) -> Trial:
    """SIGKILL a `maskbank propose` mid-run, then run it again."""
    bank = s.tmp("kill-propose") / "bank"
    shutil.copytree(s.prepared["bank"], bank)
    t_fault, _ = s.kill_at(s.propose_cmd(bank), s.proposed["window"])
    notes = s.must(s.run(s.propose_cmd(bank)), "re-run of propose")
    return s.finish(s.check(bank, proposals=True), t_fault, *notes)


def _same_weights(a_path: Path, b_path: Path) -> list[str]:
    import torch

    a = torch.load(a_path, map_location="cpu", weights_only=True)
    b = torch.load(b_path, map_location="cpu", weights_only=True)
    problems = [] if a["step"] == b["step"] else [f"step {b['step']} != {a['step']}"]
    for part, sa, sb in (("model", a["model"], b["model"]),
                         ("ema", a["ema"]["shadow"], b["ema"]["shadow"])):  # fmt: skip
        differ = [k for k in sa if k not in sb or not torch.equal(sa[k], sb[k])]
        if differ:
            problems.append(f"{part} weights differ from the uninterrupted run ({differ[0]}, ...)")
    return problems


def kill_train(s: Suite) -> Trial:
    """SIGKILL train/run.py mid-run, `--resume`, compare with the uninterrupted weights."""
    ref = s.trained
    out = s.tmp("kill-train") / "run"
    cmd = s.train_cmd(s.proposed["bank"], out)
    t_fault, _ = s.kill_at(cmd, ref["window"])
    last = out / "checkpoints" / "last.pt"
    # Killed before its first checkpoint, there is nothing to resume: a user starts again.
    again = s.train_cmd(s.proposed["bank"], out, *(["--resume"] if last.exists() else []))
    notes = s.must(s.run(again), "resumed run")
    if not notes:
        notes = _same_weights(ref["out"] / "checkpoints" / "last.pt", last)
    return s.finish(Trial(True), t_fault, *notes)


def concurrent_prepare(s: Suite) -> Trial:
    """Two `maskbank prepare` of the same inputs into one new bank, the second started late."""
    bank = s.tmp("concurrent") / "bank"
    first = s.popen(s.prepare_cmd(bank))
    time.sleep(s.rng.uniform(0, s.prepared["window"][1] * 0.6))
    t_fault = time.monotonic()
    second = s.popen(s.prepare_cmd(bank))
    notes = []
    for name, proc in (("first", first), ("second", second)):
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            notes.append(f"{name} prepare exited {proc.returncode}: {out.strip()[-400:]}")
    return s.finish(s.check(bank), t_fault, *notes)


def propose_vs_prepare(s: Suite) -> Trial:
    """`maskbank propose` racing a `maskbank prepare` that rewrites a scan whose source file
    changed in place (same path, same id); then `maskbank propose` again as a user would.
    No proposal may belong to a stale scan version at any point after the race."""
    work = s.tmp("race")
    bank, inputs = work / "bank", work / "inputs"
    shutil.copytree(s.corpus, inputs)  # a private copy: its files are changed below
    setup = s.must(s.run(s.prepare_cmd(bank, inputs)), "setup prepare")
    if setup:
        return Trial(False, problems=setup)
    victim = s.rng.randrange(N_PHANTOMS)
    sid = f"phantom{victim}"
    ph = make_phantom("ct", shape=PHANTOM_SHAPE, spacing=(1.5, 1.5, 1.5), seed=100 + victim)
    image, _ = ph.save_nifti(inputs, sid)  # same path, new content: a new scan version
    propose = s.popen(s.propose_cmd(bank))
    time.sleep(s.rng.uniform(0, s.proposed["window"][1] * 0.8))
    t_fault = time.monotonic()
    prepare = s.popen(s.prepare_cmd(bank, inputs))
    notes = []
    for name, proc in (("propose", propose), ("prepare", prepare)):
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            notes.append(f"{name} exited {proc.returncode}: {out.strip()[-400:]}")
    stale = [p for p in Bank.open(bank).verify() if "another version" in p]
    notes += [f"right after the race: {p}" for p in stale]
    notes += s.must(s.run(s.propose_cmd(bank)), "re-run of propose")
    trial = s.check(bank, proposals=True, sources={sid: sha256_of(image)})
    return s.finish(trial, t_fault, *notes)


@contextlib.contextmanager
def tmpfs(path: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of `size_kib` at `path` (root only); Skip when this sandbox may not mount."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise Skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _du_kib(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) // 1024


def disk_full(s: Suite) -> Trial:
    """`maskbank prepare` into a bank on a file system that fills up at a random point;
    the user frees space (grows the tmpfs) and runs prepare again."""
    full = _du_kib(s.prepared["bank"])
    size = int(s.rng.uniform(0.15, 0.9) * full) + 64
    with tmpfs(s.tmp("disk-full") / "mnt", size) as mnt:
        bank = mnt / "bank"
        proc = s.run(s.prepare_cmd(bank))
        t_fault = time.monotonic()
        notes = []
        if proc.returncode not in (0, 1) or "report:" not in proc.stdout:
            notes += s.must(proc, f"prepare on a full {size} KiB file system", ())
        if bank.exists():  # readers must not see a half-written scan, even before recovery
            try:
                notes += [
                    f"while full: {p}"
                    for p in Bank.open(bank).verify()
                    if "leftover" not in p and "in progress" not in p
                ]
            except Exception as exc:
                notes.append(f"while full, the bank does not open: {exc}")
        grow = subprocess.run(["mount", "-o", f"remount,size={4 * full + 4096}k", str(mnt)])
        if grow.returncode != 0:
            notes.append("could not grow the tmpfs")
        notes += s.must(s.run(s.prepare_cmd(bank)), "re-run of prepare after freeing space")
        return s.finish(s.check(bank), t_fault, *notes)


def _flip_or_truncate(s: Suite, path: Path) -> str:
    """Damage a file the way bad disks and cut copies do: flip bytes, or cut it short."""
    raw = bytearray(path.read_bytes())
    if s.rng.random() < 0.5 and len(raw) > 1:
        cut = s.rng.randrange(len(raw))
        path.write_bytes(bytes(raw[:cut]))
        return f"truncated {path.name} to {cut} of {len(raw)} bytes"
    offsets = sorted(s.rng.randrange(len(raw)) for _ in range(s.rng.randint(1, 8)))
    for off in offsets:
        raw[off] ^= 1 << s.rng.randrange(8)
    path.write_bytes(bytes(raw))
    return f"flipped bits at {len(offsets)} offsets of {path.name} ({len(raw)} bytes)"


def corrupt_shard(s: Suite) -> Trial:
    """Damage one random chunk/shard file; `verify` must name its scan; then the user runs
    `maskbank verify --repair`, `maskbank prepare` and `maskbank propose` again."""
    bank = s.tmp("corrupt-shard") / "bank"
    shutil.copytree(s.proposed["bank"], bank)
    shards = sorted(p for p in (bank / "scans").rglob("*") if p.is_file() and "c" in p.parts)
    victim = s.rng.choice(shards)
    sid = victim.relative_to(bank / "scans").parts[0]
    what = _flip_or_truncate(s, victim)
    t_fault = time.monotonic()
    found = Bank.open(bank).verify()
    notes = (
        []
        if any(p.startswith(f"{sid}:") for p in found)
        else [f"verify did not name {sid} after: {what} ({victim.relative_to(bank)})"]
    )
    notes += s.must(s.run(s.maskbank("verify", "--repair", str(bank))), "verify --repair", (0, 1))
    notes += s.must(s.run(s.prepare_cmd(bank)), "re-run of prepare")
    notes += s.must(s.run(s.propose_cmd(bank)), "re-run of propose")
    trial = s.check(bank, proposals=True)
    if not trial.survived and not notes:
        # What does recover it: dropping the scan by the Python API, then the same re-runs.
        Bank.open(bank, mode="a").delete_scan(sid)
        s.run(s.prepare_cmd(bank))
        s.run(s.propose_cmd(bank))
        api = "recovers" if s.check(bank, proposals=True).survived else "does not recover it"
        notes.append(
            f"verify named it, but verify --repair + prepare + propose left it damaged after: "
            f"{what} ({victim.relative_to(bank)}); Bank.delete_scan + prepare + propose {api}"
        )
    return s.finish(trial, t_fault, *notes)


def corrupt_index(s: Suite) -> Trial:
    """Damage index.json; `verify` must report it; `maskbank verify --repair` must mend it."""
    bank = s.tmp("corrupt-index") / "bank"
    shutil.copytree(s.prepared["bank"], bank)
    what = _flip_or_truncate(s, bank / "index.json")
    t_fault = time.monotonic()
    notes = []
    probe = s.run(s.maskbank("verify", str(bank)))
    if probe.returncode != 1:
        try:  # a flip inside JSON whitespace changes nothing a reader uses
            same = Bank.open(bank).index == Bank.open(s.prepared["bank"]).index
        except Exception as exc:
            same = False
            notes.append(f"index unreadable by readers: {exc}")
        if not same:
            notes.append(f"verify exited {probe.returncode}, not 1, after: {what}")
    notes += s.must(s.run(s.maskbank("verify", "--repair", str(bank))), "verify --repair")
    return s.finish(s.check(bank), t_fault, *notes)


def corrupt_row(s: Suite) -> Trial:
    """Damage one scan's index row file and leave the temp row of a killed writer beside it;
    `verify` must report both; `maskbank verify --repair` must mend them."""
    bank = s.tmp("corrupt-row") / "bank"
    shutil.copytree(s.prepared["bank"], bank)
    ref = Bank.open(bank)
    sid = s.rng.choice(ref.scan_ids)
    path = index_rows.row_path(bank, sid)
    path.parent.mkdir(exist_ok=True)
    path.write_text(index_rows.row_text(sid, ref.row(sid)), encoding="utf-8")
    what = _flip_or_truncate(s, path)
    temp = path.parent / f".{sid}.json.{s.rng.getrandbits(32):08x}.tmp"
    temp.write_text(index_rows.row_text(sid, ref.row(sid))[:40], encoding="utf-8")
    t_fault = time.monotonic()
    notes = []
    found = Bank.open(bank, strict_index=False).verify()
    if not any(temp.name in p and p.startswith("leftover") for p in found):
        notes.append(f"verify did not report the leftover {temp.name}")
    try:
        same = Bank.open(bank).index == ref.index  # a flip that keeps the row: harmless
    except Exception:
        same = False
    named = (f"corrupt index row {path.parent.name}/{sid}.json", f"{sid}: index row differs")
    if not same and not any(p.startswith(named) for p in found):
        notes.append(f"verify did not report the damaged row of {sid} after: {what}")
    notes += s.must(s.run(s.maskbank("verify", "--repair", str(bank))), "verify --repair")
    if [p.name for p in path.parent.iterdir()]:
        notes.append(
            f"row files left after verify --repair: {sorted(p.name for p in path.parent.iterdir())}"
        )
    return s.finish(s.check(bank), t_fault, *notes)


def corrupt_checkpoint(s: Suite) -> Trial:
    """Damage the checkpoint a run would resume from: `--resume` must refuse it with exit 2
    and a message (no traceback); `--resume-from` an older one must still end exactly like
    the uninterrupted run."""
    ref = s.trained["out"]
    steps = list(range(2 * TRAIN_CKPT_EVERY, TRAIN_STEPS, TRAIN_CKPT_EVERY))
    at = s.rng.choice(steps)  # a run "stopped" at this checkpoint, with older ones beside it
    out = s.tmp("corrupt-ckpt") / "run"
    (out / "checkpoints").mkdir(parents=True)
    for step in range(TRAIN_CKPT_EVERY, at + 1, TRAIN_CKPT_EVERY):
        name = f"step_{step:08d}.pt"
        shutil.copyfile(ref / "checkpoints" / name, out / "checkpoints" / name)
    os.link(out / "checkpoints" / f"step_{at:08d}.pt", out / "checkpoints" / "last.pt")
    what = _flip_or_truncate(s, out / "checkpoints" / "last.pt")
    t_fault = time.monotonic()
    notes = []
    bank = s.proposed["bank"]
    refused = s.run(s.train_cmd(bank, out, "--resume"))
    err = refused.stdout + refused.stderr
    if refused.returncode != 2:
        notes.append(f"--resume from a damaged checkpoint exited {refused.returncode}, not 2 "
                     f"({what})")  # fmt: skip
    elif "Traceback" in err or "error:" not in err:
        notes.append(f"refusal without a clear message: {err.strip()[-300:]}")
    if refused.returncode != 0:
        older = out / "checkpoints" / f"step_{at - TRAIN_CKPT_EVERY:08d}.pt"
        again = s.run(s.train_cmd(bank, out, "--resume-from", str(older)))
        notes += s.must(again, f"--resume-from {older.name}")
    if (out / "checkpoints" / f"step_{TRAIN_STEPS:08d}.pt").exists():
        notes += _same_weights(ref / "checkpoints" / "last.pt", out / "checkpoints" / "last.pt")
    elif not notes:
        notes.append("no final checkpoint")
    return s.finish(Trial(True), t_fault, *notes)


def hostile_files(s: Suite) -> Trial:
    """Good scans mixed with a gzip bomb, a huge-grid header, a truncated .nii and a
    NaN-filled scan: the good land, each bad one fails alone with a reason, RSS stays bounded."""
    import gzip

    import nibabel as nib
    import numpy as np

    work = s.tmp("hostile")
    inputs = work / "inputs"
    shutil.copytree(s.corpus, inputs)
    bad: dict[str, Path] = {}
    rng = np.random.default_rng(s.rng.randrange(1 << 30))
    noise = rng.normal(0, 100, (16, 16, 16)).astype(np.float32)
    bad["bomb"] = inputs / "bomb.nii.gz"
    member = gzip.compress(bytes(64 << 20), compresslevel=9)
    with open(bad["bomb"], "wb") as fh:  # 2.5 GiB of zeros behind a valid 16^3 scan
        fh.write(gzip.compress(nib.Nifti1Image(noise, np.eye(4)).to_bytes()))
        for _ in range(40):
            fh.write(member)
    bad["hugegrid"] = inputs / "hugegrid.nii.gz"
    big = rng.normal(0, 100, (64, 64, 64)).astype(np.float32)
    nib.save(nib.Nifti1Image(big, np.diag([200.0, 200.0, 200.0, 1.0])), bad["hugegrid"])
    good_raw = nib.Nifti1Image(big, np.diag([3.0, 3.0, 3.0, 1.0])).to_bytes()
    bad["truncated"] = inputs / "truncated.nii"
    bad["truncated"].write_bytes(good_raw[: s.rng.randrange(400, len(good_raw) - 1)])
    nan = big.copy()
    nan[rng.random(nan.shape) < s.rng.uniform(0.01, 1.0)] = np.nan
    bad["nanfilled"] = inputs / "nanfilled.nii.gz"
    nib.save(nib.Nifti1Image(nan, np.diag([3.0, 3.0, 3.0, 1.0])), bad["nanfilled"])
    bank = work / "bank"
    cmd = [*s.prepare_cmd(bank, inputs), "--json"]
    cmd[cmd.index("--workers") + 1] = "2"
    t_fault = time.monotonic()
    with open(work / "stdout.json", "w+") as out_fh:  # the JSON report alone, logs apart
        pid = subprocess.Popen(cmd, cwd=REPO, env=s.env, stdout=out_fh,
                               stderr=subprocess.DEVNULL).pid  # fmt: skip
        _, status, usage = os.wait4(pid, 0)  # this run's own peak RSS
        out_fh.seek(0)
        out = out_fh.read()
    returncode = os.waitstatus_to_exitcode(status)
    notes = []
    if returncode != 1:
        notes.append(f"prepare exited {returncode}, not 1: {out.strip()[-300:]}")
    try:
        rows = {r["scan_id"]: r for r in json.loads(out)["scans"]}
    except (ValueError, KeyError) as exc:
        rows = {}
        notes.append(f"no JSON report ({exc})")
    for name in bad:
        row = rows.get(name)
        if row is None or row["status"] != "failed" or not row.get("reason"):
            notes.append(f"{name}: expected a failure with a reason, got {row}")
    if usage.ru_maxrss > RSS_BOUND_KIB:
        notes.append(f"peak RSS {usage.ru_maxrss >> 10} MiB > {RSS_BOUND_KIB >> 10} MiB")
    return s.finish(s.check(bank), t_fault, *notes)


RUNNERS: dict[str, Callable[[Suite], Trial]] = {
    "kill-prepare": kill_prepare,
    "kill-propose": kill_propose,
    "kill-train": kill_train,
    "concurrent-prepare": concurrent_prepare,
    "propose-vs-prepare": propose_vs_prepare,
    "disk-full": disk_full,
    "corrupt-shard": corrupt_shard,
    "corrupt-index": corrupt_index,
    "corrupt-row": corrupt_row,
    "corrupt-checkpoint": corrupt_checkpoint,
    "hostile-files": hostile_files,
}


def run_fault(s: Suite, name: str, trials: int, log: Callable[[str], None]) -> dict:
    """Per-fault figures; every problem of a trial that did not survive is kept."""
    results: list[Trial] = []
    for i in range(trials):
        try:
            trial = RUNNERS[name](s)
        except Skip as exc:
            return {"name": name, "trials": 0, "survived": 0, "scans_lost": 0,
                    "scans_damaged": 0, "recover_s": None, "skipped": str(exc)}  # fmt: skip
        results.append(trial)
        state = "survived" if trial.survived else "FAILED"
        log(f"{name} trial {i + 1}/{trials}: {state}, recover {trial.recover_s} s"
            + "".join(f"\n    {p}" for p in trial.problems[:8]))  # fmt: skip
    times = [t.recover_s for t in results if t.survived and t.recover_s is not None]
    return {
        "name": name,
        "trials": len(results),
        "survived": sum(t.survived for t in results),
        "scans_lost": sum(t.scans_lost for t in results),
        "scans_damaged": sum(t.scans_damaged for t in results),
        "recover_s": round(statistics.median(times), 2) if times else None,
        "problems": [p for t in results if not t.survived for p in t.problems],
    }


def table(rows: list[dict]) -> str:
    lines = ["| fault | trials | survived | scans lost | scans damaged | recover s (median) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | | |")
            continue
        rec = "–" if r["recover_s"] is None else f"{r['recover_s']:.1f}"
        lines.append(f"| {r['name']} | {r['trials']} | {r['survived']} | {r['scans_lost']} "
                     f"| {r['scans_damaged']} | {rec} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3, help="trials per fault (default: 3)")
    p.add_argument("--faults", default=",".join(FAULTS), help="comma list (default: all)")
    p.add_argument("--seed", type=int, default=0, help="draws the fault moments (default: 0)")
    p.add_argument("--json", action="store_true", help='print {"faults": [...]} as JSON')
    p.add_argument("--out", help="keep the work folder (banks, runs) here instead of a temp dir")
    p.add_argument("--real", action="store_true", help="add real sample scans from ../shared/data")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        p.error(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS)}")
    if args.out:
        root = Path(args.out).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            p.error(f"--out {root} is not empty")
        cleanup = None
    else:
        root = Path(tempfile.mkdtemp(prefix="maskbank-faults-"))
        cleanup = root

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    suite = Suite(root, args.seed, args.real)
    t0 = time.monotonic()
    try:
        rows = [run_fault(suite, name, args.trials, log) for name in names]
    finally:
        suite.stop()
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    if args.json:
        print(json.dumps({"faults": rows, "seed": args.seed, "seconds": round(
            time.monotonic() - t0, 1)}, indent=1))  # fmt: skip
    else:
        print(table(rows))
        for r in rows:
            for line in r.get("problems", [])[:20]:
                print(f"{r['name']}: {line}")
    return 0 if all(r["survived"] == r["trials"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
