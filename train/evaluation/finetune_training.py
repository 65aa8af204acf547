"""Fine-tuning one network on one split and label fraction, at every rate of the grid.

The recipe is fine-tuning's own, not pretraining's: AdamW (no weight decay on norms,
biases or task embeddings), a one-cycle schedule (linear warm-up, cosine down) and
gradient-norm clipping, once per peak rate of ``lr_grid``. Each rate trains a copy of
the same start on the same crops; validation Dice before training and every
``val_every`` steps keeps the best weights. The (rate, step) with the best validation
Dice (ties: the smaller rate, then the earlier step) is scored on the test scans, once.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from maskbank.train.optimizer_setup import one_cycle
from maskbank.train.seeding import seeded_torch
from maskbank.train.seg_loss import segmentation_loss

from .checkpoint import LoadedNetwork
from .finetune_data import CropSampler, ScanAccess
from .finetune_model import FixedTaskNet, initial_tasks, test_scores, validation_dice
from .splits import Split
from .structures import StructureClass

if TYPE_CHECKING:
    from .finetune import FinetuneOptions

OPTIMIZER = "adamw"


def _optimizer(model: FixedTaskNet, options: FinetuneOptions, lr: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases or the task embeddings."""
    task_params = {id(p) for p in [*model.tokens.values(), model.fg0]}
    decay = [p for p in model.parameters() if p.ndim > 1 and id(p) not in task_params]
    rest = [p for p in model.parameters() if p.ndim <= 1 or id(p) in task_params]
    groups = [
        {"params": decay, "weight_decay": float(options.weight_decay)},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(options.betas))


@dataclass
class Candidate:
    """One learning rate's training: its validation curve and best weights."""

    lr: float
    curve: list[dict[str, Any]]
    best_step: int
    best_val: float
    final_loss: float
    seconds: float
    state: dict[str, torch.Tensor] | None  # best weights; dropped once another rate wins

    def record(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "val_dice": self.best_val,
            "best_step": self.best_step,
            "final_loss": self.final_loss,
            "val_curve": self.curve,
            "seconds": self.seconds,
        }


@dataclass
class RateSearch:
    """What every rate of one (network, split, fraction) shares: data, crops, budget."""

    classes: Sequence[StructureClass]
    val_ids: Sequence[str]
    sampler: CropSampler
    access: ScanAccess
    crop: int
    options: FinetuneOptions

    def validation_dice(self, model: FixedTaskNet) -> float:
        return validation_dice(
            model, self.classes, self.val_ids, self.access, self.crop, self.options
        )


def _host_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights copied to the CPU: the best so far are held beside the training model."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _train_step(
    model: FixedTaskNet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    search: RateSearch,
    step: int,
) -> float:
    """One optimiser step on the step's crops; the loss."""
    options = search.options
    device = torch.device(options.device)
    batch = {k: v.to(device) for k, v in search.sampler.batch(step, options.batch_size).items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(batch["image"])[:, : len(search.classes)]
    loss, _ = segmentation_loss(logits, batch["target"], batch["valid"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if options.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def train_one_rate(
    start: FixedTaskNet, val0: float, lr: float, search: RateSearch, label: str
) -> Candidate:
    """Train a copy of ``start`` at peak rate ``lr``; keep the weights of the best validation.

    ``val0`` is the validation Dice of ``start`` (the same for every rate, so computed once).
    """
    t0 = time.perf_counter()
    options = search.options
    model = copy.deepcopy(start).train()
    optimizer = _optimizer(model, options, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: one_cycle(step, options.steps, options.warmup_frac)
    )
    cand = Candidate(lr, [{"step": 0, "val_dice": val0}], 0, val0, float("nan"), 0.0, None)
    cand.state = _host_copy(model)
    bar = None
    if options.progress:
        from tqdm import tqdm

        bar = tqdm(total=options.steps, desc=f"finetune {label} lr {lr:g}", dynamic_ncols=True)
    with seeded_torch(options.seed, "finetune"):  # the same stream for every rate
        for step in range(1, options.steps + 1):
            cand.final_loss = _train_step(model, optimizer, scheduler, search, step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{cand.final_loss:.3f}", best=f"{cand.best_val:.3f}")
            if step % options.val_every == 0 or step == options.steps:
                val = search.validation_dice(model)
                cand.curve.append({"step": step, "val_dice": val, "loss": cand.final_loss})
                if val > cand.best_val or not np.isfinite(cand.best_val):
                    cand.best_step, cand.best_val = step, val
                    cand.state = _host_copy(model)
    if bar is not None:
        bar.close()
    cand.seconds = time.perf_counter() - t0
    return cand


def search_rates(
    start: FixedTaskNet, search: RateSearch, label: str
) -> tuple[list[Candidate], Candidate]:
    """Every rate of the grid (ascending: a tie keeps the smaller rate); all and the best.

    Only the best rate's weights are kept.
    """
    val0 = search.validation_dice(start)
    tried: list[Candidate] = []
    best: Candidate | None = None
    for lr in search.options.lr_grid:
        cand = train_one_rate(start, val0, lr, search, label)
        tried.append(cand)
        if best is None or cand.best_val > best.best_val or not np.isfinite(best.best_val):
            if best is not None:
                best.state = None
            best = cand
        else:
            cand.state = None
    assert best is not None and best.state is not None
    return tried, best


def finetune_once(
    net: LoadedNetwork,
    name: str,
    classes: Sequence[StructureClass],
    split: Split,
    fraction: float,
    access: ScanAccess,
    crop: int,
    options: FinetuneOptions,
    on_model: Callable[[FixedTaskNet], Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``net`` on ``fraction`` of the training scans at every rate of the grid.

    The (rate, step) with the best validation Dice is scored on the test scans, once;
    ``on_model`` gets that selected network (e.g. to save it for ``maskbank segment``).
    """
    t0 = time.perf_counter()
    device = torch.device(options.device)
    train_ids = split.fraction(fraction)
    base = copy.deepcopy(net.model).to(device).eval()
    tasks, missing = initial_tasks(base, classes, train_ids, access, crop, device)
    start = FixedTaskNet(base, tasks).to(device)
    sampler_seed = (options.seed * 1_000_003 + split.seed * 7_919 + round(fraction * 1e6)) & (
        0xFFFFFFFF
    )
    sampler = CropSampler(classes, train_ids, access, crop, options.fg_share, sampler_seed)
    search = RateSearch(classes, split.validation_ids, sampler, access, crop, options)
    tried, best = search_rates(start, search, f"{name} {fraction:g}")
    model = copy.deepcopy(start)
    model.load_state_dict(best.state)
    if on_model is not None:
        on_model(model)
    return {
        "network": name,
        "label": net.label,
        "split_seed": split.seed,
        "fraction": fraction,
        "train_scans": train_ids,
        "untrained_classes": missing,
        "steps": options.steps,
        "optimizer": OPTIMIZER,
        "lr": best.lr,
        "lr_grid": list(options.lr_grid),
        "lr_search": [c.record() for c in tried],
        "best_step": best.best_step,
        "val_dice": best.best_val,
        "val_curve": best.curve,
        "final_loss": best.final_loss,
        "test": test_scores(model, classes, split.test_ids, access, crop, options),
        "seconds": time.perf_counter() - t0,
    }
