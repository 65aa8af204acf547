"""The published aggregation, its bootstrap confidence intervals and paired tests.

Rows are per (structure class, query) scores: dicts with ``dataset``, ``class``, a
query key (``query``, and ``repeat`` when references were drawn several times) and
the metrics. Only rows where the structure is present in the query enter a mean.

* **Per class**: the mean over its queries.
* **Per dataset**: the mean over its classes (each class counts once, however many
  queries hold it, so a structure labelled in every scan does not outvote a rare one).
* **Headline**: the mean over datasets (each dataset counts once). This is what
  published few-shot tables report; the micro mean over all (class, query) rows is
  secondary, reported beside it.

Uncertainty: a percentile bootstrap (default 1000 resamples, 95 %) that resamples the
queries within each class with replacement and recomputes the headline through the
same hierarchy. Classes and datasets are the fixed design, so they are not resampled.
The draws are seeded, so the same rows give the same interval.

Paired comparison of two networks on the same rows: the difference of their
headlines, its bootstrap interval (the same resampling applied to both, i.e. to the
per-pair differences), and the Wilcoxon signed-rank p over the (class, query) pairs.

Fine-tuning reports its test scores with the same statistic: pass its per (class,
test scan) rows to ``headline``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from maskbank.train.seeding import numpy_rng

METRICS = ("dice", "hd95", "asd", "nsd")
BOOTSTRAP = 1000
LEVEL = 0.95
HEADLINE_IS = "mean over datasets of the mean over classes of the mean over queries"


def _by_class(rows: Iterable[dict], metric: str) -> dict[tuple[str, str], np.ndarray]:
    """Per (dataset, class): the metric over its rows, in row order."""
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        value = r.get(metric)
        if value is not None and r.get("present", True):
            out[(str(r["dataset"]), str(r["class"]))].append(float(value))
    return {k: np.asarray(v, dtype=np.float64) for k, v in sorted(out.items())}


def _roll_up(per_class: dict[tuple[str, str], Any]) -> tuple[dict[str, Any], Any]:
    """Class values (floats or bootstrap arrays) -> dataset means and the headline."""
    by_dataset: dict[str, list[Any]] = defaultdict(list)
    for (dataset, _), value in per_class.items():
        by_dataset[dataset].append(value)
    datasets = {d: sum(v) / len(v) for d, v in sorted(by_dataset.items())}
    return datasets, sum(datasets.values()) / len(datasets)


def headline(rows: Sequence[dict], metric: str = "dice") -> dict[str, Any] | None:
    """``{"mean", "micro", "datasets": {d: mean}, "classes": {(d, c): mean}}`` or None."""
    per_class = _by_class(rows, metric)
    if not per_class:
        return None
    class_means = {k: float(v.mean()) for k, v in per_class.items()}
    datasets, mean = _roll_up(class_means)
    micro = float(np.concatenate(list(per_class.values())).mean())
    return {"mean": float(mean), "micro": micro, "datasets": datasets, "classes": class_means}


def _rng(seed: int, metric: str, salt: str = "") -> np.random.Generator:
    return numpy_rng(seed, f"{metric}\0{salt}")


def _resampled_means(values: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    idx = rng.integers(0, len(values), size=(n, len(values)))
    return values[idx].mean(axis=1)


def _interval(samples: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_ci(
    rows: Sequence[dict],
    metric: str = "dice",
    n: int = BOOTSTRAP,
    seed: int = 0,
    level: float = LEVEL,
) -> list[float] | None:
    """Percentile interval of the headline, resampling queries within each class."""
    per_class = _by_class(rows, metric)
    if not per_class:
        return None
    rng = _rng(seed, metric)
    samples = {k: _resampled_means(v, rng, n) for k, v in per_class.items()}
    _, head = _roll_up(samples)
    return _interval(np.asarray(head), level)


def pair_key(row: dict) -> tuple:
    """What identifies one scored (class, query) across networks."""
    return (row["dataset"], row["class"], row["query"], row.get("shots"), row.get("repeat", 0))


def paired(
    rows: Sequence[dict],
    baseline: Sequence[dict],
    metric: str = "dice",
    n: int = BOOTSTRAP,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Any] | None:
    """``rows`` minus ``baseline`` over their common present pairs: diff, CI, Wilcoxon p."""
    base = {
        pair_key(r): r for r in baseline if r.get("present", True) and r.get(metric) is not None
    }
    diffs = []
    for r in rows:
        b = base.get(pair_key(r))
        if b is None or not r.get("present", True) or r.get(metric) is None:
            continue
        diffs.append({**r, metric: float(r[metric]) - float(b[metric])})
    if not diffs:
        return None
    head = headline(diffs, metric)
    assert head is not None
    ci = bootstrap_ci(diffs, metric, n, seed, level)
    d = np.asarray([r[metric] for r in diffs])
    return {
        "diff": head["mean"],
        "ci": ci,
        "p": wilcoxon_p(d),
        "pairs": len(diffs),
        "test": "Wilcoxon signed-rank over (class, query) pairs",
    }


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p; 1.0 when every difference is zero."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=np.float64)
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d).pvalue)


def summary(
    rows: Sequence[dict], n: int = BOOTSTRAP, seed: int = 0, level: float = LEVEL
) -> dict[str, Any]:
    """Headline, micro mean and CI of every metric, plus the per-dataset Dice means."""
    out: dict[str, Any] = {"headline": HEADLINE_IS}
    for metric in METRICS:
        head = headline(rows, metric)
        out[f"mean_{metric}"] = head["mean"] if head else None
        out[f"micro_{metric}"] = head["micro"] if head else None
        out[f"mean_{metric}_ci"] = bootstrap_ci(rows, metric, n, seed, level) if head else None
        if metric == "dice" and head:
            out["datasets"] = head["datasets"]
    return out
