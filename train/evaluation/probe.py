"""Frozen-encoder probe: does the pretrained encoder's representation predict a scan-level target?

The encoder is frozen; each scan's deepest features form a token set (``probe_head.py``)
that a small attention-pooling head, trained on the training folds only, turns into a
prediction of the target (a metadata column or ``has:<class>``; ``probe_target.py``).
Stratified k-fold cross-validation gives every scan one out-of-fold prediction; AUROC
(one-vs-rest macro for several classes) and balanced accuracy per fold
(``probe_metrics.py``). The random encoder (same preset, seeded) runs beside the
checkpoint with the same folds, head and seeds: the difference is what pretraining bought.

The steps: ``plan`` (target and folds), ``score`` (features, then every fold per network),
``summarise`` into a ``ProbeResult`` (``probe_report.py``); ``run`` does all of them.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .checkpoint import LoadedNetwork
from .errors import EvaluationError
from .probe_head import ProbeSettings, fit_predict, scan_tokens
from .probe_metrics import balanced_accuracy, binary_auroc, macro_auroc, roc_points
from .probe_report import PLOT, ProbeResult, probe_markdown, probe_plot, probe_text
from .probe_target import ProbeTarget, plan_folds, resolve_target, stratified_folds
from .result import record

__all__ = [
    "PLOT",
    "ProbeOptions",
    "ProbePlan",
    "ProbeResult",
    "ProbeSettings",
    "ProbeTarget",
    "balanced_accuracy",
    "binary_auroc",
    "fit_predict",
    "macro_auroc",
    "plan",
    "plan_folds",
    "probe_markdown",
    "probe_plot",
    "probe_text",
    "roc_points",
    "run",
    "scan_tokens",
    "score",
    "stratified_folds",
    "summarise",
]


@dataclass(frozen=True)
class ProbeOptions:
    """What is predicted, over how many folds, and the head's fixed recipe."""

    target: str  # a metadata column (e.g. diagnosis) or has:<class name or value>
    folds: int = 5
    seed: int = 0  # folds and head seeds
    device: str = "cpu"
    settings: ProbeSettings = field(default_factory=ProbeSettings)

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise EvaluationError(f"--folds {self.folds}: give at least 2")
        if self.settings.epochs < 1:
            raise EvaluationError(f"--epochs {self.settings.epochs}: give at least 1")


@dataclass
class ProbePlan:
    """The networks, the scans in id order, the target and the folds (test indices)."""

    networks: list[LoadedNetwork]
    ids: list[str]
    scans: list[Any]
    target: ProbeTarget
    warnings: list[str]
    splits: list[np.ndarray]

    @property
    def y(self) -> np.ndarray:
        return self.target.y(self.ids)


def plan(
    bank,
    networks: Sequence[LoadedNetwork],
    options: ProbeOptions,
    scan_ids: Sequence[str] | None = None,
) -> ProbePlan:
    """Resolve the target on the scans and deal the stratified folds."""
    ids = sorted(scan_ids or bank.scan_ids)
    scans = [bank.scan(s) for s in ids]
    target = resolve_target(scans, options.target)
    n_folds, warnings = plan_folds(target, options.folds)
    splits = stratified_folds(target.y(ids), n_folds, options.seed)
    return ProbePlan(list(networks), ids, scans, target, warnings, splits)


def features(
    planned: ProbePlan, options: ProbeOptions, progress: bool = False
) -> tuple[list[list[torch.Tensor]], list[float]]:
    """Per network, every scan's token set (each scan read once), and the seconds it took."""
    tokens: list[list[torch.Tensor]] = [[] for _ in planned.networks]
    seconds = [0.0 for _ in planned.networks]
    for n, scan in enumerate(planned.scans):
        image = np.asarray(scan.read("image"), dtype=np.float32)
        for i, net in enumerate(planned.networks):
            t0 = time.perf_counter()
            net.model.to(options.device)
            tokens[i].append(
                scan_tokens(
                    net.model, image, net.crop, options.device, options.settings.window_batch
                )
            )
            seconds[i] += time.perf_counter() - t0
        if progress:
            print(f"\rprobe: features {n + 1}/{len(planned.scans)} scans", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return tokens, seconds


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite))


def cross_validate(
    tokens: list[torch.Tensor], planned: ProbePlan, options: ProbeOptions
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Out-of-fold probabilities, each scan's fold, and per fold the scores."""
    y, n = planned.y, len(planned.ids)
    oof = np.zeros((n, len(planned.target.classes)))
    fold_of = np.zeros(n, dtype=np.int64)
    per_fold = []
    for f, test in enumerate(planned.splits):
        train = np.setdiff1d(np.arange(n), test)
        probs = fit_predict(
            [tokens[j] for j in train],
            y[train],
            [tokens[j] for j in test],
            len(planned.target.classes),
            options.settings,
            options.seed + f,
            options.device,
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
    return oof, fold_of, per_fold


def _network_result(
    net: LoadedNetwork, tokens: list[torch.Tensor], seconds: float, planned: ProbePlan, options
) -> dict[str, Any]:
    oof, fold_of, per_fold = cross_validate(tokens, planned, options)
    y, tgt = planned.y, planned.target
    auroc, auroc_std = _mean_std([p["auroc"] for p in per_fold])
    bacc, bacc_std = _mean_std([p["balanced_accuracy"] for p in per_fold])
    return {
        "network": net.label,
        "auroc": auroc,
        "auroc_std": auroc_std,
        "balanced_accuracy": bacc,
        "balanced_accuracy_std": bacc_std,
        "auroc_pooled": macro_auroc(y, oof),
        "balanced_accuracy_pooled": balanced_accuracy(y, oof.argmax(1)),
        "folds": per_fold,
        "tokens_per_scan": float(np.mean([t.shape[0] for t in tokens])),
        "feature_dim": int(tokens[0].shape[1]),
        "feature_seconds": seconds,
        "predictions": [
            {
                "scan": s,
                "target": tgt.values[s],
                "fold": int(fold_of[j]),
                "predicted": tgt.classes[int(oof[j].argmax())],
                "probabilities": dict(zip(tgt.classes, oof[j].tolist(), strict=True)),
            }
            for j, s in enumerate(planned.ids)
        ],
    }


def score(planned: ProbePlan, options: ProbeOptions, progress: bool = False) -> list[dict]:
    """Per network: features once, then a head per fold; scores and out-of-fold predictions."""
    tokens, seconds = features(planned, options, progress)
    return [
        _network_result(net, tokens[i], seconds[i], planned, options)
        for i, net in enumerate(planned.networks)
    ]


def summarise(planned: ProbePlan, scored: list[dict], options: ProbeOptions) -> ProbeResult:
    """Target, classes, folds and per network the mean and std over folds."""
    tgt = planned.target
    return ProbeResult(
        {
            "evaluation": "probe",
            "target": tgt.name,
            "target_kind": tgt.kind,
            "classes": tgt.classes,
            "class_counts": tgt.counts(),
            "folds_requested": options.folds,
            "folds_used": len(planned.splits),
            "warnings": planned.warnings,
            "splits": [
                {"fold": f, "test": [planned.ids[j] for j in test]}
                for f, test in enumerate(planned.splits)
            ],
            "settings": {**asdict(options.settings), "window_overlap": 0.0, "seed": options.seed},
            "networks": scored,
        }
    )


def run(
    bank,
    networks: Sequence[LoadedNetwork],
    options: ProbeOptions,
    *,
    scan_ids: Sequence[str] | None = None,
    progress: bool = False,
    command: Sequence[str] | None = None,
) -> ProbeResult:
    """Cross-validated probe of ``options.target`` for each network (same folds and seeds).

    ``command`` is recorded as the provenance's command line (default ``sys.argv``).
    """
    planned = plan(bank, networks, options, scan_ids)
    result = summarise(planned, score(planned, options, progress), options)
    record(result.data, command, bank, planned.networks)
    return result
