"""The probe's scores: AUROC by the rank (Mann-Whitney) formula, balanced accuracy, ROC.

AUROC is one-vs-rest macro for several classes; scikit-learn is not needed.
"""

from __future__ import annotations

import math

import numpy as np


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
