"""One prepared GPU check (H100/H200, < 8 minutes): base-model throughput and data starvation.

    python bench/gpu_step.py [--bank BANK] [--json]      # on a GPU node
    python bench/gpu_step.py --smoke                      # CPU smoke path (tests, laptops)

1. Compute only: steps/s and samples/s of ``base`` at 128^3, batch 4, K = 13
   (+ the global task), bf16 autocast, on synthetic tensors already on the GPU.
2. The real trainer (``train.run.main``) on a bank with 16-core DataLoader
   workers and GPU augmentation: the data-wait fraction from its metrics.jsonl,
   and whether the GPU stays >= 90 % busy (data_wait <= 0.10).

Without --bank a phantom bank is built in a temporary directory first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from maskbank.train.incontext_net import build_model, count_parameters  # noqa: E402
from maskbank.train.optimizer_setup import build_optimizer  # noqa: E402
from maskbank.train.run import main as run_main
from maskbank.train.run_config import load_config  # noqa: E402
from maskbank.train.seg_loss import segmentation_loss  # noqa: E402


def compute_only(preset: str, crop: int, batch: int, tasks: int, steps: int, device) -> dict:
    """Forward + backward + optimiser step on fixed tensors: the GPU's ceiling."""
    torch.manual_seed(0)
    model = build_model(preset).to(device)
    opt = build_optimizer(model, load_config(preset)["optim"])
    shape = (batch, 1, crop, crop, crop)
    ref = torch.randn(shape, device=device)
    query = torch.randn(shape, device=device)
    masks = torch.rand((batch, tasks, crop, crop, crop), device=device) > 0.8
    bf16 = device.type == "cuda"

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ref, masks, query)
        loss, _ = segmentation_loss(logits, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    warm = 2 if steps > 2 else 1
    for _ in range(warm):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    out = {
        "preset": preset,
        "params_m": count_parameters(model) / 1e6,
        "crop": crop,
        "batch": batch,
        "tasks": tasks,
        "steps_per_s": steps / dt,
        "samples_per_s": steps * batch / dt,
    }
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def trainer_run(
    bank: str, preset: str, steps: int, workers: int, extra: list[str], out: Path
) -> dict:
    """Run train/run.py's main() and summarise its metrics after warm-up."""
    argv = ["--config", preset, "--bank", bank, "--out", str(out), f"max_steps={steps}",
            f"data.num_workers={workers}", f"train.ckpt_every={10**9}", "train.tensorboard=false",
            "train.progress=false", "train.log_every=1", *extra]  # fmt: skip
    t = time.perf_counter()
    rc = run_main(argv)
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steady = rows[len(rows) // 3 :] or rows  # skip warm-up (worker start, cudnn autotune)
    wait = statistics.mean(r["data_wait"] for r in steady)
    return {
        "rc": rc,
        "steps": len(rows),
        "wall_s": wall,
        "steps_per_s": 1 / statistics.median(r["step_s"] for r in steady),
        "pairs_per_s": statistics.median(r["pairs_per_s"] for r in steady),
        "data_wait": wait,
        "gpu_busy_ge_90pct": wait <= 0.10,
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "workers": workers,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", help="bank path/URL (default: build a phantom bank)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default cores-1)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="also write the result JSON here")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        preset, crop, batch, steps = "tiny", 32, 2, args.steps or 3
        shape, n_scans = (64, 64, 48), 2
        extra = ["data.batch_size=2"]
    else:
        if not cuda:
            print("no CUDA device: use --smoke for the CPU path", file=sys.stderr)
            return 2
        preset, crop, batch, steps = "base", 128, 4, args.steps or 60
        shape, n_scans = (192, 192, 160), 4
        extra = ["data.batch_size=4", "data.crop=128", "train.bf16=true"]
        torch.backends.cudnn.benchmark = True
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    if args.smoke:
        workers = min(workers, 1)
    result: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    t0 = time.perf_counter()
    result["compute_only"] = compute_only(preset, crop, batch, 14, max(2, steps // 4), device)
    if cuda:
        torch.cuda.empty_cache()  # free the compute-only model before the trainer builds its own
    with tempfile.TemporaryDirectory(prefix="maskbank-gpu-") as tmp:
        bank = args.bank
        if bank is None:
            from maskbank.flows.demo_bank import build_phantom_bank

            t = time.perf_counter()
            bank = str(Path(tmp) / "bank")
            build_phantom_bank(bank, n_scans=n_scans, shape=shape)
            result["bank_build_s"] = time.perf_counter() - t
        result["trainer"] = trainer_run(bank, preset, steps, workers, extra, Path(tmp) / "run")
    result["total_s"] = time.perf_counter() - t0
    text = json.dumps(result, indent=None if args.json else 1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if result["trainer"]["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
