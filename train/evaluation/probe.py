"""Frozen-encoder probe: does the pretrained encoder's representation predict a scan-level target?

The encoder is frozen, so each scan's features are computed once per network: the
scan is cut into non-overlapping windows of the network's crop (padded with the scan
minimum, as everywhere else in evaluation), and the deepest level's feature vectors
of all windows form one token set per scan. A small head (a learned scoring vector
whose softmax weights pool the tokens, then a linear layer) is trained on the
training folds only; features are standardised with training-fold statistics, so
nothing of a test scan leaks into its prediction. The head starts as plain mean
pooling (zero scores) and learns where to look.

Stratified k-fold cross-validation gives every scan one out-of-fold prediction.
AUROC (one-vs-rest macro for several classes) is computed with the rank
(Mann-Whitney) formula, so scikit-learn is not needed. The random encoder (same
preset, seeded) runs beside the checkpoint with the same folds, head and seeds:
the difference is what pretraining bought.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import EvaluationError
from .report import markdown_table, provenance_markdown, text_table

HAS_PREFIX = "has:"
ABSENT, PRESENT = "absent", "present"  # the classes of a has:<class> target (sorted order)
PLOT = "probe.png"


# --------------------------------------------------------------------------- metrics


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (what the Mann-Whitney U needs)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.ravel()]


def binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half; NaN if one side is empty."""
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    u = average_ranks(score)[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """AUROC of class 1 for two classes; else the mean one-vs-rest AUROC of classes present."""
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 2:
        return binary_auroc(y == 1, probs[:, 1])
    per = [binary_auroc(y == c, probs[:, c]) for c in range(probs.shape[1])]
    per = [a for a in per if not math.isnan(a)]
    return float(np.mean(per)) if per else math.nan


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (chance is 1/classes, whatever the balance)."""
    y, pred = np.asarray(y), np.asarray(pred)
    if y.size == 0:
        return math.nan
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def roc_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every threshold, from (0, 0) to (1, 1)."""
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], positive[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    tp = np.cumsum(p)[last]
    fp = (last + 1) - tp
    n_pos, n_neg = max(int(p.sum()), 1), max(int((~p).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


# --------------------------------------------------------------------------- target


@dataclass
class ProbeTarget:
    """What is predicted: one class string per scan, and the sorted classes."""

    name: str
    kind: str  # "metadata" (a manifest column) or "label" (has:<class>)
    values: dict[str, str]  # scan id -> class
    classes: list[str]

    def y(self, scan_ids: Sequence[str]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[self.values[s]] for s in scan_ids], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        vals = list(self.values.values())
        return {c: vals.count(c) for c in self.classes}


def _shorten(ids: Sequence[str], n: int = 10) -> str:
    ids = list(ids)
    return ", ".join(ids[:n]) + (f" ... ({len(ids)} in all)" if len(ids) > n else "")


def _metadata_target(scans: Sequence, column: str) -> ProbeTarget:
    values: dict[str, str] = {}
    missing: list[str] = []
    columns: set[str] = set()
    for scan in scans:
        meta = scan.metadata
        columns.update(meta)
        if meta.get(column, "").strip():
            values[scan.scan_id] = meta[column].strip()
        else:
            missing.append(scan.scan_id)
    if not values:
        have = ", ".join(sorted(columns)) or "none"
        raise EvaluationError(
            f"no scan has the metadata column {column!r} (columns in these scans: {have}); "
            f"give --target COLUMN with one of them, or has:<class> for a label class"
        )
    if missing:
        raise EvaluationError(
            f"target {column!r} is missing in {len(missing)} scan(s): {_shorten(missing)}; "
            "fill the column in the manifest for them, or leave them out with --scans"
        )
    return ProbeTarget(column, "metadata", values, sorted(set(values.values())))


def _label_target(scans: Sequence, spec: str) -> ProbeTarget:
    wanted = spec[len(HAS_PREFIX) :].strip()
    if not wanted:
        raise EvaluationError("--target has: needs a class name or value, e.g. has:lesion")
    unlabelled = [s.scan_id for s in scans if not s.has("label")]
    if unlabelled:
        raise EvaluationError(
            f"--target {spec} reads label maps, but {len(unlabelled)} scan(s) have none: "
            f"{_shorten(unlabelled)}; leave them out with --scans"
        )
    by_dataset: dict[str, set[int]] = {}
    every: set[int] = set()
    names: set[str] = set()
    for scan in scans:
        for value, name in scan.label_names.items():
            names.add(name)
            if name == wanted:
                by_dataset.setdefault(scan.dataset or "default", set()).add(value)
                every.add(value)
    if not every and wanted.lstrip("-").isdigit():
        every = {int(wanted)}
    if not every:
        have = ", ".join(sorted(names)) or "none (give the label value, e.g. has:3)"
        raise EvaluationError(
            f"no label class named {wanted!r} in these scans (label names: {have}); "
            "give --target has:<name> or has:<value>"
        )
    values: dict[str, str] = {}
    for scan in scans:
        candidates = by_dataset.get(scan.dataset or "default", every)
        if len(candidates) > 1:
            raise EvaluationError(
                f"label class {wanted!r} has several values {sorted(candidates)} in dataset "
                f"{scan.dataset!r}; give the value instead, e.g. has:{min(candidates)}"
            )
        label = np.asarray(scan.read("label"))
        present = bool((label == next(iter(candidates))).any())
        values[scan.scan_id] = PRESENT if present else ABSENT
    return ProbeTarget(spec, "label", values, sorted(set(values.values())))


def resolve_target(scans: Sequence, target: str) -> ProbeTarget:
    """A metadata column (``diagnosis``) or ``has:<class>`` (name from label names, or value)."""
    if target.startswith(HAS_PREFIX):
        return _label_target(scans, target)
    return _metadata_target(scans, target)


# --------------------------------------------------------------------------- folds


def plan_folds(target: ProbeTarget, folds: int) -> tuple[int, list[str]]:
    """Folds that stratification allows (each class in every test fold), and any warning."""
    counts = target.counts()
    if len(counts) < 2:
        raise EvaluationError(
            f"target {target.name!r} has one class only ({_shorten(list(counts))}) in these "
            "scans; a probe needs at least two classes"
        )
    small = {c: n for c, n in counts.items() if n < 2}
    if small:
        detail = "; ".join(
            f"{c!r}: {_shorten([s for s, v in target.values.items() if v == c])}" for c in small
        )
        raise EvaluationError(
            f"target {target.name!r}: class(es) with fewer than 2 scans ({detail}); "
            "cross-validation needs each class in at least two scans: add scans or merge classes"
        )
    fewest = min(counts.values())
    if fewest >= folds:
        return folds, []
    rare = min(counts, key=lambda c: counts[c])
    return fewest, [
        f"--folds {folds} reduced to {fewest}: class {rare!r} has only {fewest} scans "
        "(every test fold must hold every class)"
    ]


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Test indices of each fold; each class shuffled and dealt round-robin (sizes differ <= 1)."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for c in np.unique(y):
        members = rng.permutation(np.nonzero(y == c)[0])
        for j, i in enumerate(members):
            out[(offset + j) % folds].append(int(i))
        offset += len(members)
    return [np.array(sorted(f), dtype=np.int64) for f in out]


# --------------------------------------------------------------------------- features


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


# --------------------------------------------------------------------------- head


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
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean, std = _token_stats(train_tokens)
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


# --------------------------------------------------------------------------- run


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite))


def run_probe(
    networks: Sequence,
    bank,
    scan_ids: Sequence[str] | None,
    target: str,
    folds: int = 5,
    settings: ProbeSettings | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Cross-validated probe of ``target`` for each loaded network (same folds and head seeds).

    Returns the results dict (without provenance): target, classes, splits, and per
    network the mean/std AUROC and balanced accuracy over folds, per-fold numbers and
    out-of-fold predictions.
    """
    settings = settings or ProbeSettings()
    ids = sorted(scan_ids or bank.scan_ids)
    scans = [bank.scan(s) for s in ids]
    tgt = resolve_target(scans, target)
    n_folds, warnings = plan_folds(tgt, folds)
    y = tgt.y(ids)
    splits = stratified_folds(y, n_folds, seed)

    tokens: list[list[torch.Tensor]] = [[] for _ in networks]
    seconds = [0.0 for _ in networks]
    for n, scan in enumerate(scans):
        image = np.asarray(scan.read("image"), dtype=np.float32)
        for i, net in enumerate(networks):
            t0 = time.perf_counter()
            net.model.to(device)
            tokens[i].append(scan_tokens(net.model, image, net.crop, device, settings.window_batch))
            seconds[i] += time.perf_counter() - t0
        if progress:
            print(f"\rprobe: features {n + 1}/{len(scans)} scans", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)

    results_nets = []
    for i, net in enumerate(networks):
        oof = np.zeros((len(ids), len(tgt.classes)))
        fold_of = np.zeros(len(ids), dtype=np.int64)
        per_fold = []
        for f, test in enumerate(splits):
            train = np.setdiff1d(np.arange(len(ids)), test)
            probs = fit_predict(
                [tokens[i][j] for j in train],
                y[train],
                [tokens[i][j] for j in test],
                len(tgt.classes),
                settings,
                seed + f,
                device,
            )
            oof[test] = probs
            fold_of[test] = f
            per_fold.append(
                {
                    "fold": f,
                    "auroc": macro_auroc(y[test], probs),
                    "balanced_accuracy": balanced_accuracy(y[test], probs.argmax(1)),
                    "n_train": int(train.size),
                    "n_test": int(test.size),
                }
            )
        auroc, auroc_std = _mean_std([p["auroc"] for p in per_fold])
        bacc, bacc_std = _mean_std([p["balanced_accuracy"] for p in per_fold])
        results_nets.append(
            {
                "network": net.label,
                "auroc": auroc,
                "auroc_std": auroc_std,
                "balanced_accuracy": bacc,
                "balanced_accuracy_std": bacc_std,
                "auroc_pooled": macro_auroc(y, oof),
                "balanced_accuracy_pooled": balanced_accuracy(y, oof.argmax(1)),
                "folds": per_fold,
                "tokens_per_scan": float(np.mean([t.shape[0] for t in tokens[i]])),
                "feature_dim": int(tokens[i][0].shape[1]),
                "feature_seconds": seconds[i],
                "predictions": [
                    {
                        "scan": s,
                        "target": tgt.values[s],
                        "fold": int(fold_of[j]),
                        "predicted": tgt.classes[int(oof[j].argmax())],
                        "probabilities": dict(zip(tgt.classes, oof[j].tolist(), strict=True)),
                    }
                    for j, s in enumerate(ids)
                ],
            }
        )
    return {
        "evaluation": "probe",
        "target": tgt.name,
        "target_kind": tgt.kind,
        "classes": tgt.classes,
        "class_counts": tgt.counts(),
        "folds_requested": folds,
        "folds_used": n_folds,
        "warnings": warnings,
        "splits": [{"fold": f, "test": [ids[j] for j in test]} for f, test in enumerate(splits)],
        "settings": {**asdict(settings), "window_overlap": 0.0, "seed": seed},
        "networks": results_nets,
    }


# --------------------------------------------------------------------------- report


def _table_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    def pm(mean: Any, std: Any) -> str:
        if mean is None or (isinstance(mean, float) and math.isnan(mean)):
            return "–"
        return f"{mean:.3f} ± {std:.3f}"

    return [
        {
            "network": n["network"],
            "AUROC": pm(n["auroc"], n["auroc_std"]),
            "balanced accuracy": pm(n["balanced_accuracy"], n["balanced_accuracy_std"]),
        }
        for n in results["networks"]
    ]


COLUMNS = ("network", "AUROC", "balanced accuracy")


def probe_text(results: dict[str, Any]) -> str:
    """The terminal summary: what was predicted, over how many folds, and the table."""
    counts = ", ".join(f"{c}: {n}" for c, n in results["class_counts"].items())
    lines = [
        f"probe of {results['target']!r} ({counts}); {results['folds_used']}-fold "
        "cross-validation, mean ± std over folds",
        *[f"warning: {w}" for w in results["warnings"]],
        "",
        text_table(_table_rows(results), COLUMNS),
    ]
    return "\n".join(lines)


def probe_markdown(results: dict[str, Any], record: dict[str, Any]) -> str:
    counts = ", ".join(f"{c}: {n}" for c, n in results["class_counts"].items())
    warn = "".join(f"> warning: {w}\n\n" for w in results["warnings"])
    return (
        f"# Frozen-encoder probe: {results['target']}\n\n"
        f"Classes: {counts}. Stratified {results['folds_used']}-fold cross-validation; "
        "AUROC (one-vs-rest macro for several classes) and balanced accuracy, mean ± std "
        "over folds. The encoder is frozen; an attention-pooling head is trained per fold.\n\n"
        f"{warn}{markdown_table(_table_rows(results), COLUMNS)}\n\n"
        f"![AUROC per network]({PLOT})\n\n{provenance_markdown(record)}"
    )


def probe_plot(path: str | Path, results: dict[str, Any]) -> Path:
    """AUROC and balanced accuracy per network (bars, ± std); ROC curves for two classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = results["networks"]
    binary = len(results["classes"]) == 2
    fig, axes = plt.subplots(1, 2 if binary else 1, figsize=(9 if binary else 5, 3.6), dpi=110)
    axes = np.atleast_1d(axes)
    ax = axes[0]
    x = np.arange(len(nets))
    for k, (key, name) in enumerate((("auroc", "AUROC"), ("balanced_accuracy", "bal. acc."))):
        vals = [np.nan if n[key] is None else n[key] for n in nets]
        errs = [0.0 if n[f"{key}_std"] is None else n[f"{key}_std"] for n in nets]
        ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, yerr=errs, capsize=3, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, [n["network"] for n in nets])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"probe: {results['target']}")
    ax.legend(fontsize=8)
    if binary:
        positive = results["classes"][1]
        for n in nets:
            pos = np.array([p["target"] == positive for p in n["predictions"]])
            score = np.array([p["probabilities"][positive] for p in n["predictions"]])
            fpr, tpr = roc_points(pos, score)
            axes[1].plot(fpr, tpr, label=n["network"])
        axes[1].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        axes[1].set_xlabel("false-positive rate")
        axes[1].set_ylabel("true-positive rate")
        axes[1].set_title(f"out-of-fold ROC ({positive})")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
