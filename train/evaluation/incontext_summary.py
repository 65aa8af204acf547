"""The in-context means: per network and k, the published statistic with intervals.

Per class the mean over its queries, per dataset over its classes, the headline over
datasets (``aggregate.py``), with bootstrap intervals and, for every network after the
first, paired tests against the first. Per k only the classes scorable at every
requested k are summarised (those dropped are listed). Beside the Dice, each class's
median predicted / true volume, and per network how many classes keep it within
``VOLUME_RANGE``: a network that over-predicts shows it there before the Dice does.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from . import aggregate
from .calibration import describe
from .references import RANDOM_REFS

if TYPE_CHECKING:
    from .incontext import InContextOptions

VOLUME_RANGE = (0.5, 2.0)  # a class's median predicted / true volume counted as in range


def class_table(rows: list[dict]) -> list[dict[str, Any]]:
    """Per class: means over present queries, misses, and false positives where absent."""
    by_class: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_class[(r["dataset"], r["class"])].append(r)
    table = []
    for (dataset, name), rs in sorted(by_class.items()):
        present = [r for r in rs if r["present"]]
        absent = [r for r in rs if not r["present"]]
        entry: dict[str, Any] = {"dataset": dataset, "class": name, "value": rs[0]["value"]}
        entry["queries"] = len(present)
        for m in aggregate.METRICS:
            entry[m] = float(np.mean([r[m] for r in present])) if present else None
        entry["hd95_median"] = float(np.median([r["hd95"] for r in present])) if present else None
        # Median predicted / true volume: how far a class is over- or under-segmented.
        entry["volume_ratio"] = (
            float(np.median([r["pred_voxels"] / r["gt_voxels"] for r in present]))
            if present
            else None
        )
        entry["misses"] = sum(bool(r["miss"]) for r in present)
        entry["absent_queries"] = len(absent)
        entry["fp_queries"] = sum(bool(r["false_positive"]) for r in absent)
        entry["fp_rate"] = entry["fp_queries"] / len(absent) if absent else None
        entry["fp_ml_mean"] = float(np.mean([r["fp_ml"] for r in absent])) if absent else None
        table.append(entry)
    return table


def _rows(structures: list[dict], label: str, k: int, common: set) -> list[dict]:
    return [
        r
        for r in structures
        if r["network"] == label and r["shots"] == k and (r["dataset"], r["value"]) in common
    ]


def summary_entry(
    label: str,
    k: int,
    rows: list[dict],
    queries: list[dict],
    options: InContextOptions,
    dropped: list[str],
) -> dict[str, Any]:
    """One network at k shots: headline with interval, per dataset and per class."""
    present = [r for r in rows if r["present"]]
    stats = aggregate.summary(present, options.bootstrap, options.seed)
    mine = [q for q in queries if q["network"] == label and q["shots"] == k]
    secs = [q["seconds"] for q in mine]
    calib = [q["calibration_seconds"] for q in mine if "calibration_seconds" in q]
    classes = class_table(rows)
    per_dataset = defaultdict(list)
    for c in classes:
        per_dataset[c["dataset"]].append(c)
    return {
        "network": label,
        "shots": k,
        **stats,
        "median_hd95": float(np.median([r["hd95"] for r in present])) if present else None,
        "structures": len(present),
        "classes_scored": len(classes),
        "misses": sum(bool(r["miss"]) for r in present),
        "absent_rows": len(rows) - len(present),
        "false_positives": sum(bool(r.get("false_positive")) for r in rows),
        "seconds_per_query": float(np.mean(secs)) if secs else None,
        "calibration_seconds_per_query": float(np.mean(calib)) if calib else None,
        "classes_volume_in_range": sum(
            VOLUME_RANGE[0] <= c["volume_ratio"] <= VOLUME_RANGE[1]
            for c in classes
            if c["volume_ratio"] is not None
        ),
        "datasets": [
            {"dataset": d, "mean_dice": (stats.get("datasets") or {}).get(d), "classes": len(cs)}
            for d, cs in sorted(per_dataset.items())
        ],
        "classes": classes,
        "dropped": dropped,
        "class_ci": {
            f"{c['dataset']}/{c['class']}": aggregate.bootstrap_ci(
                [r for r in present if (r["dataset"], r["class"]) == (c["dataset"], c["class"])],
                "dice",
                options.bootstrap,
                options.seed,
            )
            for c in classes
        },
    }


def _network_row(s: dict[str, Any], k0: int) -> dict[str, Any]:
    """A network's headline at the fewest shots, and its paired test against the first."""
    paired_dice = (s.get("paired") or {}).get("dice")
    keep = ("mean_dice", "mean_dice_ci", "mean_hd95", "median_hd95", "mean_asd", "mean_nsd")
    return {
        "name": s["network"],
        "shots": k0,
        **{key: s[key] for key in keep},
        "misses": s["misses"],
        "seconds_per_query": s["seconds_per_query"],
        "paired": (
            {k: paired_dice[k] for k in ("diff", "ci", "p", "pairs")} if paired_dice else None
        ),
    }


def options_record(options: InContextOptions, window: int | None) -> dict[str, Any]:
    """The options as ``results.json`` records them (what ``compare`` checks)."""
    record = {
        "shots": list(options.shots),
        "references": options.references,
        "repeats": options.repeats if options.references == RANDOM_REFS else 1,
        "seed": options.seed,
        "overlap": options.overlap,
        "threshold": describe(options.threshold, options.threshold_by, options.calibration_copy),
        "tolerance_mm": options.tolerance_mm,
        "fp_min_voxels": options.fp_min_voxels,
        "bootstrap": options.bootstrap,
        "label_names": (
            {str(k): v for k, v in sorted(options.label_names.items())}
            if options.label_names
            else None
        ),
        "window": window,
    }
    if options.reference_zoom != "off":  # recorded when on, so earlier runs still compare
        record.update(
            reference_zoom=options.reference_zoom,
            max_zoom=options.max_zoom,
            zoom_refine=options.zoom_refine,
        )
    return record


def summarise(
    labels: list[str],
    options: InContextOptions,
    structures: list[dict],
    queries: list[dict],
    not_scored: list[dict],
    figures: list[str],
    common: set[tuple[str, int]] | None = None,
    dropped: dict[int, list[str]] | None = None,
    window: int | None = None,
) -> dict[str, Any]:
    """Per network and k: the published means with CIs, per dataset and class, paired tests.

    ``mean_dice`` is the first network's headline at the fewest shots.
    """
    if common is None:
        common = {(r["dataset"], r["value"]) for r in structures}
    dropped = dropped or {}
    summary = []
    for label in labels:
        for k in options.shots:
            rows = _rows(structures, label, k, common)
            if not rows:
                continue
            entry = summary_entry(label, k, rows, queries, options, dropped.get(k, []))
            if label != labels[0]:
                first = _rows(structures, labels[0], k, common)
                present = [r for r in rows if r["present"]]
                entry["paired"] = {
                    m: aggregate.paired(present, first, m, options.bootstrap, options.seed)
                    for m in ("dice", "hd95")
                }
            summary.append(entry)
    k0 = min(options.shots)
    heads = {s["network"]: s for s in summary if s["shots"] == k0}
    head = heads.get(labels[0])
    return {
        "evaluation": "incontext",
        "options": options_record(options, window),
        "headline": aggregate.HEADLINE_IS,
        "mean_dice": head["mean_dice"] if head else None,
        "mean_dice_ci": head["mean_dice_ci"] if head else None,
        "micro_dice": head["micro_dice"] if head else None,
        "datasets": head["datasets"] if head else [],
        "misses": head["misses"] if head else None,
        "networks": [_network_row(heads[n], k0) for n in labels if n in heads],
        "summary": summary,
        "structures": structures,
        "queries": queries,
        "not_scored": not_scored,
        "figures": figures,
    }
