"""One prepared GPU check (one H100/H200): pretrain ``small`` for a wall-clock budget, then evaluate.

    python bench/gpu_pretrain.py [--minutes 8] [--out DIR] [--data DIR]   # on a GPU node
    python bench/gpu_pretrain.py --smoke [--out DIR]                     # CPU smoke path (tests)

Stages (seconds of each in the result):

1. bank: labelled CT phantoms of several seeds in one dataset (``phantom-ct``; half
   with lesions, metadata ``lesion`` yes/no), plus the real sample scans of ``--data``
   prepared at 1.5 mm with engine proposals (same pipeline functions as the prepare
   and propose flows, called directly: no Prefect or Dask needed).
2. pretrain: ``train/run.py`` (in-context pretext) in a subprocess for ``--minutes``.
   The one-cycle LR schedule needs ``max_steps`` up front, so a short calibration run
   measures steps/s, then the run resumes with the ``max_steps`` that fills the rest
   of the budget; a SIGTERM at the deadline (checkpoint, exit 0) guards the end.
3. evaluations on the phantoms (real scans are one-scan datasets, too few to split):
   in-context 1-shot Dice (pretrained vs random), fine-tuning test Dice at label
   fractions 0.2 and 1.0 (pretrained vs scratch), frozen-encoder probe AUROC of
   ``lesion`` (pretrained vs random). Random/scratch use the pretrained crop.

Prints ONE JSON object (keys: device, preset, crop, batch_size, workers, budget_s,
bank, steps, calibration_steps, steps_per_s, pairs_per_s, data_wait, loss_first,
loss_last, incontext, finetune, probe, seconds, out) and writes it to OUT/result.json
with the full evaluation results beside it.

Device command. The GPU image has torch, scipy, scikit-image, torch-geometric,
matplotlib, pyyaml and tqdm but not maskbank itself, zarr (+ donfig, google-crc32c), numcodecs, monai,
nibabel or connected-components-3d (the last two for the real scans), so carry them as
wheels (about 16 MB), and the real scans (about 17 MB; ``../shared`` beside a checkout
does not travel).
Once, here, in the repository root::

    echo /.whl/ >> .git/info/exclude; echo /.bench_data/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 \
      donfig==0.8.1.post1 google-crc32c==1.9.0 nibabel==5.4.2 monai==1.6.1 \
      connected-components-3d==4.1.1 dynamic-network-architectures==0.4.4 einops==0.8.2
    .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl .   # maskbank itself
    mkdir -p .bench_data && cp ../shared/data/ct_chest_lung1*.nii.gz \
      ../shared/data/ct_head_template_1mm.nii.gz ../shared/data/mr_brain_aniso_4x4x5mm.nii.gz \
      ../shared/data/mr_brain_mni152_t1_1mm.nii.gz ../shared/data/mr_brain_mni152_aicha_* \
      .bench_data/

then ``run`` with ``carry=[".whl", ".bench_data"]``, ``timeout_s=600`` and::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
    PYTHONUNBUFFERED=1 python3 bench/gpu_pretrain.py --minutes 5 --data .bench_data \
      --out /tmp/gp 2>$OUT/stderr.log;
    cp /tmp/gp/*.json /tmp/gp/pretrain/metrics.jsonl /tmp/gp/pretrain/train.log $OUT/

(the bank stays outside $OUT: only a few small files come back). One command may run
10 minutes and bank building, start-up and the evaluations come on top of the budget
(their seconds are in the result), so ``--minutes 5`` leaves room; the default 8 is
for a machine without that limit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

# (scan id, image, label, label names, modality): the real sample scans used when present.
REAL_SCANS: tuple[tuple[str, str, str | None, str | None, str], ...] = (
    ("real-ct-chest", "ct_chest_lung1.nii.gz", "ct_chest_lung1_nodule_label.nii.gz", None, "ct"),
    ("real-ct-head", "ct_head_template_1mm.nii.gz", None, None, "ct"),
    (
        "real-mr-mni152",
        "mr_brain_mni152_t1_1mm.nii.gz",
        "mr_brain_mni152_aicha_labels_1mm.nii.gz",
        "mr_brain_mni152_aicha_labels_1mm.json",
        "mr",
    ),
    ("real-mr-aniso", "mr_brain_aniso_4x4x5mm.nii.gz", None, None, "mr"),
)
PHANTOM_DATASET = "phantom-ct"
PROBE_TARGET = "lesion"
FRACTIONS = (0.2, 1.0)


def default_data_dir() -> Path | None:
    """The project's shared sample scans, inside or beside the checkout, if present."""
    for cand in (REPO / "shared" / "data", REPO.parent / "shared" / "data"):
        if (cand / REAL_SCANS[0][1]).exists():
            return cand
    return None


# --------------------------------------------------------------------------- bank


def build_bank(
    path: Path, n_phantoms: int, shape: tuple[int, int, int], data: Path | None
) -> tuple[Any, list[str], dict[str, Any]]:
    """Phantoms (the evaluation set) plus prepared real scans; returns bank, phantom ids, info."""
    from maskbank.bank import Bank
    from maskbank.flows.demo_bank import add_phantom_scan

    bank = Bank.create(str(path))
    phantoms = []
    for i in range(n_phantoms):
        lesion = i % 2 == 0  # alternate, so both probe classes get n/2 scans
        sid = f"{PHANTOM_DATASET}-{i:03d}"
        add_phantom_scan(
            bank,
            sid,
            "ct",
            shape,
            seed=i,
            dataset=PHANTOM_DATASET,
            n_lesions=2 if lesion else 0,
            metadata={PROBE_TARGET: "yes" if lesion else "no"},
        )
        phantoms.append(sid)
    real, failed = [], []
    if data is not None:
        for scan_id, image, label, names, modality in REAL_SCANS:
            try:
                add_real_scan(bank, data, scan_id, image, label, names, modality)
                real.append(scan_id)
            except (FileNotFoundError, ValueError) as exc:  # ScanError is a ValueError
                failed.append({"scan": scan_id, "reason": str(exc)[:300]})
    info = {"scans": len(phantoms) + len(real), "phantoms": len(phantoms), "real": real}
    if failed:
        info["real_failed"] = failed
    return Bank.open(str(path)), phantoms, info


def add_real_scan(
    bank: Any,
    data: Path,
    scan_id: str,
    image: str,
    label: str | None,
    names: str | None,
    modality: str,
) -> None:
    """Prepare one real scan at 1.5 mm and store engine proposals, as the two flows do per scan."""
    from maskbank.bank.writing import write_proposals
    from maskbank.pipeline.config import PrepareConfig
    from maskbank.pipeline.normalize import invert_normalization
    from maskbank.pipeline.prepare import prepare_scan
    from maskbank.pipeline.proposals.engine import ProposalConfig, generate_proposals
    from maskbank.pipeline.reader import sha256_of

    img_path = data / image
    if not img_path.exists():
        raise FileNotFoundError(f"{img_path} not found")
    label_path = data / label if label and (data / label).exists() else None
    names_path = data / names if names and label_path and (data / names).exists() else None
    prepared = prepare_scan(
        img_path,
        label_path,
        config=PrepareConfig(spacing=(1.5, 1.5, 1.5), modality=modality),
        dataset=scan_id,
        source_sha256=sha256_of(img_path),
        label_names=names_path,
    )
    bank.write_scan(scan_id, prepared.arrays(), prepared.attrs)
    scan = bank.scan(scan_id)
    raw = np.asarray(scan.read("image"), dtype=np.float32)
    norm = scan.attrs.get("normalization")
    raw = invert_normalization(raw, norm) if norm else raw  # the engine's CT windows are in HU
    body = (
        np.asarray(scan.read("body"), dtype=bool) if scan.has("body") else np.ones(raw.shape, bool)
    )
    cfg = ProposalConfig()
    ps = generate_proposals(raw, body, scan.spacing, scan.modality or modality, cfg)
    write_proposals(
        bank,
        scan_id,
        ps,
        {"config": cfg.to_dict(), "fingerprint": cfg.fingerprint(), "modality": modality},
    )


# --------------------------------------------------------------------------- pretraining


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Training rows of metrics.jsonl written so far (a half-written last line is left for
    later; held-out validation rows, which carry no loss, are left out)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if "loss" in row:
            rows.append(row)
    return rows


def run_trainer(
    argv: list[str], log: Path, metrics: Path, stop: Callable[[int, float], bool]
) -> tuple[int, float | None]:
    """Run train/run.py; SIGTERM it once ``stop(new_rows, now)``; returns (rc, first-row time).

    The signal is only sent after a metrics row exists, i.e. after the trainer has
    installed its SIGTERM handler (an earlier signal would kill it without a checkpoint).
    """
    before = len(read_rows(metrics))
    first_row = None
    with open(log, "a") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "train" / "run.py"), *argv], stdout=fh, stderr=fh
        )
        signalled = False
        while proc.poll() is None:
            time.sleep(0.25)
            new = len(read_rows(metrics)) - before
            now = time.perf_counter()
            if new > 0 and first_row is None:
                first_row = now
            if new > 0 and not signalled and stop(new, now):
                proc.send_signal(signal.SIGTERM)
                signalled = True
    return proc.returncode, first_row


def _steady(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows after warm-up (worker start, first allocations): drop the first fifth, >= 1 row."""
    skip = min(max(1, len(rows) // 5), len(rows) - 1)
    return rows[skip:]


def pretrain(
    bank: str,
    out: Path,
    preset: str,
    budget_s: float,
    overrides: list[str],
    cal_s: float,
    cal_rows: int,
    max_steps: int | None,
) -> dict[str, Any]:
    """Calibrate steps/s, then resume with the max_steps that fills ``budget_s``."""
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    log, metrics = out / "train.log", out / "metrics.jsonl"
    base = ["--config", preset, "--bank", bank, "--out", str(out), "pretext=incontext",
            "train.log_every=1", "train.tensorboard=false", "train.progress=false",
            f"train.ckpt_every={10**9}", *overrides]  # fmt: skip
    cap = max_steps if max_steps is not None else 10**6
    first: list[float] = []

    def stop_calibration(new: int, now: float) -> bool:
        if not first:
            first.append(now)
        return (new >= cal_rows and now - first[0] >= cal_s) or now >= deadline

    rc, first_row = run_trainer([*base, f"train.max_steps={cap}"], log, metrics, stop_calibration)
    if rc != 0:
        raise RuntimeError(f"calibration run failed (rc {rc}); see {log}")
    cal = read_rows(metrics)
    if not cal:
        raise RuntimeError(f"calibration run logged no step; see {log}")
    s0 = int(cal[-1]["step"])
    rate = 1.0 / statistics.median(r["step_s"] for r in _steady(cal))
    startup = (first_row or t0) - t0 - float(cal[0]["step_s"])  # process start to first step
    remaining = deadline - time.perf_counter() - max(startup, 0.0)
    target = min(cap, s0 + int(rate * remaining * 0.97))
    if target > s0:
        rc, _ = run_trainer(
            ["--resume", *base, f"train.max_steps={target}"],
            log,
            metrics,
            lambda new, now: now >= deadline,
        )
        if rc != 0:
            raise RuntimeError(f"resumed run failed (rc {rc}); see {log}")
    rows = read_rows(metrics)
    steady = _steady(cal) + _steady(rows[len(cal) :]) if len(rows) > len(cal) else _steady(cal)
    return {
        "steps": int(rows[-1]["step"]),
        "calibration_steps": s0,
        "steps_per_s": 1.0 / statistics.mean(r["step_s"] for r in steady),
        "pairs_per_s": statistics.median(r["pairs_per_s"] for r in steady),
        "data_wait": statistics.mean(r["data_wait"] for r in steady),
        "loss_first": float(rows[0]["loss"]),
        "loss_last": float(rows[-1]["loss"]),
    }


# --------------------------------------------------------------------------- evaluations


def evaluations(
    bank: Any, run_dir: Path, ids: list[str], device: str, smoke: bool, ft_steps: int, out: Path
) -> tuple[dict[str, Any], dict[str, float]]:
    """In-context, fine-tuning and probe results, pretrained vs untrained, on the phantoms."""
    from maskbank.train.evaluation import finetune, incontext, probe
    from maskbank.train.evaluation.checkpoint import RANDOM, SCRATCH, load_network

    def networks(baseline: str) -> tuple[Any, Any]:
        pre = load_network(str(run_dir))
        base = load_network(baseline, pre.preset, 0)
        base.crop = pre.crop  # the same windows and crops for both networks
        return pre, base

    result: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    pre, rnd = networks(RANDOM)
    ic_options = incontext.InContextOptions(shots=(1,), device=device)
    ic = incontext.run(bank, [pre, rnd], ic_options, scan_ids=ids)
    by_net = {s["network"]: s["mean_dice"] for s in ic["summary"] if s["shots"] == 1}
    result["incontext"] = {"pretrained": by_net[pre.label], "random": by_net[rnd.label]}
    (out / "incontext.json").write_text(ic.json())
    seconds["incontext"] = time.perf_counter() - t

    t = time.perf_counter()
    pre, scratch = networks(SCRATCH)
    ft_options = finetune.FinetuneOptions(
        fractions=FRACTIONS,
        steps=ft_steps,
        val_every=max(1, ft_steps // 3),
        device=device,
    )
    named = [("pretrained", pre), ("scratch", scratch)]
    ft = finetune.run(bank, named, ft_options, scan_ids=ids)
    result["finetune"] = {
        str(f): {r["network"]: r["test"]["mean_dice"] for r in ft["runs"] if r["fraction"] == f}
        for f in FRACTIONS
    }
    (out / "finetune.json").write_text(ft.json())
    seconds["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    pre, rnd = networks(RANDOM)
    settings = probe.ProbeSettings(epochs=5 if smoke else 60)
    pr_options = probe.ProbeOptions(PROBE_TARGET, settings=settings, device=device)
    pr = probe.run(bank, [pre, rnd], pr_options, scan_ids=ids)
    auroc = {n["network"]: n["auroc"] for n in pr["networks"]}
    result["probe"] = {"pretrained": auroc[pre.label], "random": auroc[rnd.label]}
    (out / "probe.json").write_text(pr.json())
    seconds["probe"] = time.perf_counter() - t
    return result, seconds


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[3:]),
    )  # fmt: skip
    p.add_argument("--minutes", type=float, default=8.0, help="pretraining wall-clock budget")
    p.add_argument("--out", help="keep everything here (default: a temporary directory)")
    p.add_argument("--data", help="real sample scans (default: shared/data in or beside the repo)")
    p.add_argument("--no-real", action="store_true", help="phantoms only")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, whole path in seconds")
    p.add_argument("--phantoms", type=int, default=None, help="phantom scans (default 8; smoke 4)")
    p.add_argument("--crop", type=int, default=None, help="crop edge (default 128; smoke 32)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default cores-1)")
    p.add_argument("--finetune-steps", type=int, default=None, help="default 300; smoke 3")
    p.add_argument(
        "--encoder",
        choices=("iris", "resenc-l", "resenc-tiny"),
        default="iris",
        help="iris: the small (smoke: tiny) preset; resenc-l / resenc-tiny: nnU-Net's residual "
        "encoder preset of that name (exportable with `maskbank export`)",
    )
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: use --smoke for the CPU path", file=sys.stderr)
        return 2
    if args.smoke:
        preset, crop, n_phantoms, shape = "tiny", args.crop or 32, args.phantoms or 4, (48, 48, 40)
        budget_s, cal_s, cal_rows, max_steps = args.minutes * 60, 0.0, 3, 10
        ft_steps, workers = args.finetune_steps or 3, args.workers or 0
        data = Path(args.data) if args.data and not args.no_real else None  # real scans: opt-in
    else:
        preset, crop, n_phantoms, shape = "small", args.crop or 128, args.phantoms or 8, (128,) * 3
        budget_s, cal_rows, max_steps = args.minutes * 60, 10, None
        cal_s = min(60.0, 0.1 * budget_s)
        ft_steps = args.finetune_steps or 300
        workers = args.workers if args.workers is not None else min(15, (os.cpu_count() or 2) - 1)
        data = None if args.no_real else (Path(args.data) if args.data else default_data_dir())
        torch.backends.cudnn.benchmark = True
    if args.encoder != "iris":
        preset = args.encoder
    overrides = [f"data.crop={crop}", f"data.num_workers={workers}"]
    if args.smoke:
        overrides.append("data.batch_size=2")

    tmp = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="maskbank-gpu-pretrain-")
        out = Path(tmp.name)
    t_all = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "preset": preset,
        "crop": crop,
        "workers": workers,
        "budget_s": budget_s,
    }
    seconds: dict[str, float] = {}
    try:
        t = time.perf_counter()
        bank, ids, result["bank"] = build_bank(out / "bank", n_phantoms, shape, data)
        seconds["bank"] = time.perf_counter() - t

        t = time.perf_counter()
        run_dir = out / "pretrain"
        run_dir.mkdir(exist_ok=True)
        train = pretrain(
            str(out / "bank"), run_dir, preset, budget_s, overrides, cal_s, cal_rows, max_steps
        )
        seconds["pretrain"] = time.perf_counter() - t
        result.update(train)
        from maskbank.train.run_config import TrainConfig

        result["batch_size"] = TrainConfig.load(preset, overrides).data.batch_size

        device = "cuda" if cuda else "cpu"
        evals, eval_s = evaluations(bank, run_dir, ids, device, args.smoke, ft_steps, out)
        result.update(evals)
        seconds.update(eval_s)
        seconds["total"] = time.perf_counter() - t_all
        result["seconds"] = seconds
        result["out"] = str(out) if tmp is None else None
        text = json.dumps(result)
        (out / "result.json").write_text(text)
        print(text)
    finally:
        if tmp is not None:
            tmp.cleanup()
    finite = [result[k] for k in ("steps_per_s", "loss_first", "loss_last")]
    return 0 if all(math.isfinite(v) for v in finite) else 1


if __name__ == "__main__":
    sys.exit(main())
