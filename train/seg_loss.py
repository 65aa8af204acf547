"""Adaptive Tversky-Dice + BCE for K binary tasks per sample.

Plain Dice weighs false positives and false negatives equally; with thousands of
mask proposals of very different sizes the network drifts towards whichever
error dominates. The adaptive Tversky index re-balances per task and step:
alpha = FP / (FP + FN) (detached, clamped to [0.2, 0.8]) weights FP, 1 - alpha
weights FN, so the currently dominant error is penalised more. With alpha = 0.5
it is exactly soft Dice.

Empty targets (a structure absent from the query crop, which sliding-window inference
meets in most windows) get no region term: with eps = 1 the Tversky loss of an empty
target saturates after a few false-positive voxels (1 - 1/(1 + alpha * FP)), so it barely
pushes a confident false alarm down. The region term is averaged over tasks whose target
is not empty; the voxel term (BCE, or focal BCE) covers every task and is what teaches
"not here".
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
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Mean over (sample, task) of the voxel-mean BCE; ``focal_gamma`` > 0 weighs each voxel
    by (1 - p_true)**gamma (focal loss: confident voxels, mostly background, count less)."""
    logits, target = logits.float(), target.float()
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if focal_gamma > 0:
        p_true = torch.exp(-per)
        per = per * (1 - p_true).pow(focal_gamma)
    per = per.flatten(2).mean(-1)
    if valid is None:
        return per.mean()
    w = valid.float()
    return (per * w).sum() / w.sum().clamp_min(1.0)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    tversky_weight: float = 1.0,
    bce_weight: float = 1.0,
    focal_gamma: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted Tversky (tasks with a non-empty target) + BCE (all tasks), and the parts."""
    present = target.flatten(2).any(-1)
    tv = adaptive_tversky_loss(logits, target, present if valid is None else present & valid)
    bce = bce_loss(logits, target, valid, focal_gamma)
    total = tversky_weight * tv + bce_weight * bce
    return total, {"tversky": float(tv.detach()), "bce": float(bce.detach())}
