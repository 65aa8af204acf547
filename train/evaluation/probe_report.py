"""The probe's tables and figure: ``results.md``, the terminal table, ``probe.png``.

``ProbeResult`` is what ``probe.run`` returns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .probe_metrics import roc_points
from .report import markdown_table, provenance_markdown, text_table
from .result import Result

PLOT = "probe.png"


class ProbeResult(Result):
    """The probe results: per network the cross-validated scores and predictions."""

    kind = "probe"

    @property
    def warnings(self) -> list[str]:
        return list(self.data["warnings"])

    def markdown(self) -> str:
        return probe_markdown(self.data, self.data.get("run"))

    def text(self) -> str:
        return probe_text(self.data)

    def figures(self, out: str | Path) -> list[Path]:
        """``probe.png`` in ``out``."""
        Path(out).mkdir(parents=True, exist_ok=True)
        return [probe_plot(Path(out) / PLOT, self.data)]


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


def probe_markdown(results: dict[str, Any], record: dict[str, Any] | None) -> str:
    counts = ", ".join(f"{c}: {n}" for c, n in results["class_counts"].items())
    warn = "".join(f"> warning: {w}\n\n" for w in results["warnings"])
    return (
        f"# Frozen-encoder probe: {results['target']}\n\n"
        f"Classes: {counts}. Stratified {results['folds_used']}-fold cross-validation; "
        "AUROC (one-vs-rest macro for several classes) and balanced accuracy, mean ± std "
        "over folds. The encoder is frozen; an attention-pooling head is trained per fold.\n\n"
        f"{warn}{markdown_table(_table_rows(results), COLUMNS)}\n\n"
        f"![AUROC per network]({PLOT})\n\n" + (provenance_markdown(record) if record else "")
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
