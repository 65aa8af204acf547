"""Adaptive Tversky-Dice + BCE for K binary tasks per sample.

Plain Dice weighs false positives and false negatives equally; with thousands of
mask proposals of very different sizes the network drifts towards whichever
error dominates. The adaptive Tversky index re-balances per task and step:
alpha = FP / (FP + FN) (detached, clamped to [0.2, 0.8]) weights FP, 1 - alpha
weights FN, so the currently dominant error is penalised more. With alpha = 0.5
it is exactly soft Dice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adaptive_tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    alpha_range: tuple[float, float] = (0.2, 0.8),
    eps: float = 1.0,
) -> torch.Tensor:
    """Mean over (sample, task) of 1 - Tversky; logits/target (N,K,*S), valid (N,K) bool."""
    prob = torch.sigmoid(logits.float()).flatten(2)
    tgt = target.float().flatten(2)
    tp = (prob * tgt).sum(-1)
    fp = (prob * (1 - tgt)).sum(-1)
    fn = ((1 - prob) * tgt).sum(-1)
    with torch.no_grad():
        alpha = (fp / (fp + fn).clamp_min(1e-6)).clamp(*alpha_range)
    tversky = (tp + eps) / (tp + alpha * fp + (1 - alpha) * fn + eps)
    loss = 1 - tversky
    if valid is None:
        return loss.mean()
    w = valid.float()
    return (loss * w).sum() / w.sum().clamp_min(1.0)


def bce_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    per = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    per = per.flatten(2).mean(-1)
    if valid is None:
        return per.mean()
    w = valid.float()
    return (per * w).sum() / w.sum().clamp_min(1.0)


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (for logging)."""
    tv = adaptive_tversky_loss(logits, target, valid)
    bce = bce_loss(logits, target, valid)
    return tv + bce, {"tversky": float(tv.detach()), "bce": float(bce.detach())}
