"""What a training run writes as it goes: metrics.jsonl, TensorBoard and the progress bar.

Only the main rank logs; metrics.jsonl stays strict JSON (non-finite values as null).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskbank.train.pretext import Pretext, PretextOutput
from maskbank.train.run_config import TrainConfig


@dataclass
class StepOutcome:
    """What one optimisation step produced (for the log) and decided (skip, stop)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    result: PretextOutput
    aug: dict[str, torch.Tensor]
    skipped: bool
    preempted: bool


def _finite_or_none(value: float) -> float | None:
    """metrics.jsonl stays strict JSON: NaN and inf are written as null."""
    return value if math.isfinite(value) else None


def log_images(
    writer, step: int, pretext: Pretext, aug: dict[str, torch.Tensor], out: PretextOutput
) -> None:
    """The pretext's mid-slice tiles of the first pair, side by side (in-context: reference /
    reference mask / query / target / prediction; reconstruction: masked / mask / output /
    target)."""
    tag, tiles = pretext.image_tiles(aug, out)
    grid = torch.cat([t.detach().float().cpu() for t in tiles], dim=1)
    writer.add_image(tag, grid[None], step)


class RunLog:
    """The main rank's record of a run: metrics.jsonl, TensorBoard and the progress bar.

    Throughput and data wait are averaged over the steps since the last record.
    """

    def __init__(
        self,
        out: Path,
        cfg: TrainConfig,
        pretext: Pretext,
        device: torch.device,
        start_step: int,
        pairs_per_step: int,
        resumed: bool,
    ) -> None:
        self.tcfg, self.pretext, self.device = cfg.train, pretext, device
        self.pairs_per_step = pairs_per_step
        self.acc_data = self.acc_dt = 0.0  # accumulated since the last record
        self.acc_steps = 0
        self.metrics = open(out / "metrics.jsonl", "a" if resumed else "w", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.writer = None
        self.bar = None
        if self.tcfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"))
        if self.tcfg.progress and start_step < self.tcfg.max_steps:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.tcfg.max_steps, initial=start_step, desc="pretrain", dynamic_ncols=True
            )

    def after_step(
        self, step: int, outcome: StepOutcome, t_data: float, t_step: float, lr: float, skipped: int
    ) -> None:
        """Account for the step just taken; record it when due (and every skipped step)."""
        self.acc_data += t_data
        self.acc_dt += t_step
        self.acc_steps += 1
        due = step % self.tcfg.log_every == 0 or step == self.tcfg.max_steps
        if due or outcome.skipped:
            self._record(step, outcome, lr, skipped)
        if self.bar is not None:
            self.bar.update(1)

    def _record(self, step: int, outcome: StepOutcome, lr: float, skipped: int) -> None:
        parts = outcome.result.parts
        rec = {
            "step": step,
            "loss": _finite_or_none(float(outcome.loss.detach())),
            **parts,
            "lr": lr,
            "grad_norm": _finite_or_none(float(outcome.grad_norm)),
            "pairs_per_s": self.pairs_per_step * self.acc_steps / self.acc_dt,
            "data_wait": self.acc_data / self.acc_dt,
            "step_s": self.acc_dt / self.acc_steps,
            "skipped_steps": skipped,  # so far, on all ranks together
        }
        rec.update({k: _finite_or_none(float(v)) for k, v in parts.items()})
        self.acc_data = self.acc_dt = 0.0
        self.acc_steps = 0
        if self.device.type == "cuda":
            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            self._write_tensorboard(step, rec, outcome)
        if self.bar is not None:
            shown = "nan" if rec["loss"] is None else f"{rec['loss']:.3f}"
            self.bar.set_postfix(loss=shown, wait=f"{rec['data_wait']:.0%}", skipped=skipped)

    def _write_tensorboard(self, step: int, rec: dict[str, Any], outcome: StepOutcome) -> None:
        parts = outcome.result.parts
        keys = ("loss", *parts, "lr", "pairs_per_s", "data_wait", "grad_norm", "skipped_steps")
        for key in keys:
            if rec[key] is not None:
                self.writer.add_scalar(f"train/{key}", rec[key], step)
        if "gpu_mem_gb" in rec:
            self.writer.add_scalar("train/gpu_mem_gb", rec["gpu_mem_gb"], step)
        if step % self.tcfg.image_every == 0:
            log_images(self.writer, step, self.pretext, outcome.aug, outcome.result)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
