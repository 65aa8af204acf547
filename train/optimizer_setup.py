"""The optimiser and its learning-rate schedule, built from the typed ``optim`` section.

Shared by pretraining and fine-tuning so both follow the same policy: no weight decay
on 1-D parameters (norms, biases, tokens) and a one-cycle schedule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from maskbank.train.lamb_optim import Lamb
from maskbank.train.run_config import OptimConfig


def build_optimizer(
    model: torch.nn.Module, opt: OptimConfig | Mapping[str, Any]
) -> torch.optim.Optimizer:
    """AdamW or LAMB; ``opt`` is the typed ``optim`` section or its dict form."""
    opt = opt if isinstance(opt, OptimConfig) else OptimConfig.from_dict(opt)
    # No weight decay on norms, biases and tokens (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": opt.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = {"adamw": torch.optim.AdamW, "lamb": Lamb}[opt.name]
    return optimizer(groups, lr=opt.lr, betas=opt.betas)


def one_cycle(step: int, max_steps: int, warmup_frac: float, floor: float = 0.01) -> float:
    """LR factor: linear warm-up to 1, then cosine down to ``floor`` (a one-cycle policy).

    Written out instead of OneCycleLR, which divides by zero for very short runs.
    """
    warm = max(1, round(warmup_frac * max_steps))
    if step < warm:
        return (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, max_steps - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, opt: OptimConfig, max_steps: int):
    frac = opt.warmup_frac
    # A lambda, not a callable object: LambdaLR then keeps nothing of it in its state dict.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: one_cycle(step, max_steps, frac)
    )
