"""The probe's features and head.

The encoder is frozen, so each scan's features are computed once per network: the
scan is cut into non-overlapping windows of the network's crop (padded with the scan
minimum, as everywhere else in evaluation), and the deepest level's feature vectors
of all windows form one token set per scan. A small head (a learned scoring vector
whose softmax weights pool the tokens, then a linear layer) is trained on the
training folds only; features are standardised with training-fold statistics, so
nothing of a test scan leaks into its prediction. The head starts as plain mean
pooling (zero scores) and learns where to look.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from maskbank.train.seeding import seeded_torch, torch_generator


@torch.inference_mode()
def scan_tokens(
    model: nn.Module,
    image: np.ndarray,
    crop: int,
    device: torch.device | str = "cpu",
    window_batch: int = 4,
) -> torch.Tensor:
    """(windows * deepest voxels, channels) float16 on the CPU: the scan's token set.

    The scan is padded with its minimum to whole windows of ``crop`` (centred), and
    windows go through the frozen encoder ``window_batch`` at a time.
    """
    vol = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    fill = float(vol.min()) if vol.numel() else 0.0
    padded = [max(1, math.ceil(n / crop)) * crop for n in vol.shape]
    pads: list[int] = []
    for n, p in zip(reversed(vol.shape), reversed(padded), strict=True):
        before = (p - n) // 2
        pads += [before, p - n - before]
    vol = torch.nn.functional.pad(vol, pads, value=fill)
    corners = [
        (i, j, k)
        for i in range(0, padded[0], crop)
        for j in range(0, padded[1], crop)
        for k in range(0, padded[2], crop)
    ]
    encoder = model.encoder
    encoder.eval()
    out = []
    for b in range(0, len(corners), window_batch):
        windows = torch.stack(
            [
                vol[i : i + crop, j : j + crop, k : k + crop]
                for i, j, k in corners[b : b + window_batch]
            ]
        )[:, None].to(device)
        deepest = encoder(windows)[-1].float()  # (B, C, d, d, d)
        out.append(deepest.flatten(2).transpose(1, 2).reshape(-1, deepest.shape[1]).cpu())
    return torch.cat(out).to(torch.float16)


@dataclass
class ProbeSettings:
    """The head's training recipe: fixed, so no test fold tunes it."""

    epochs: int = 60
    lr: float = 1e-2
    weight_decay: float = 1e-2
    batch_size: int = 8
    window_batch: int = 4


class AttentionPoolHead(nn.Module):
    """Softmax-weighted mean of a scan's tokens (learned scoring vector) -> linear classifier."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)
        nn.init.zeros_(self.score.weight)  # start as mean pooling
        nn.init.zeros_(self.score.bias)
        self.classify = nn.Linear(dim, n_classes)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, T, C), ``valid`` (B, T) bool (False at padding) -> logits (B, classes)."""
        scores = self.score(tokens).squeeze(-1).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return self.classify((weights.unsqueeze(-1) * tokens).sum(1))


def _batch(
    tokens: list[torch.Tensor], mean: torch.Tensor, std: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised, zero-padded (B, T, C) tokens and their validity mask."""
    longest = max(t.shape[0] for t in tokens)
    x = torch.zeros(len(tokens), longest, mean.numel())
    valid = torch.zeros(len(tokens), longest, dtype=torch.bool)
    for i, t in enumerate(tokens):
        x[i, : t.shape[0]] = (t.float() - mean) / std
        valid[i, : t.shape[0]] = True
    return x.to(device), valid.to(device)


def _token_stats(tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over all tokens of the training scans."""
    total = sum(t.shape[0] for t in tokens)
    mean = sum(t.float().sum(0) for t in tokens) / total
    var = sum(((t.float() - mean) ** 2).sum(0) for t in tokens) / total
    return mean, var.sqrt().clamp_min(1e-6)


def fit_predict(
    train_tokens: list[torch.Tensor],
    train_y: np.ndarray,
    test_tokens: list[torch.Tensor],
    n_classes: int,
    settings: ProbeSettings,
    seed: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Train a head on the training scans; class probabilities (n_test, classes) of the test scans."""
    device = torch.device(device)
    gen = torch_generator(seed, "probe order")  # the order of the training scans per epoch
    mean, std = _token_stats(train_tokens)
    with seeded_torch(seed, "probe head"):  # the head's initial weights
        head = AttentionPoolHead(mean.numel(), n_classes).to(device)
    counts = np.bincount(train_y, minlength=n_classes).astype(np.float64)
    balance = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(balance, dtype=torch.float32, device=device))
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    y = torch.from_numpy(train_y).to(device)
    head.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(train_tokens), generator=gen).tolist()
        for b in range(0, len(order), settings.batch_size):
            idx = order[b : b + settings.batch_size]
            x, valid = _batch([train_tokens[i] for i in idx], mean, std, device)
            loss = loss_fn(head(x, valid), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    probs = []
    with torch.no_grad():
        for b in range(0, len(test_tokens), settings.batch_size):
            x, valid = _batch(test_tokens[b : b + settings.batch_size], mean, std, device)
            probs.append(torch.softmax(head(x, valid).float(), dim=1).cpu())
    return torch.cat(probs).numpy().astype(np.float64)
