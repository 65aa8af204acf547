"""The in-context tables: ``results.md`` and the terminal summary, from the results dict.

``InContextResult`` is what ``incontext.run`` returns: the results with ``markdown()``,
``text()``, ``figures(out)`` (one overlay PNG per network and class) and ``write(out)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .incontext_scoring import Overlay
from .report import fmt, markdown_table, provenance_markdown, text_table
from .result import Result

FIGURE_DIR = "figures"


class InContextResult(Result):
    """The in-context results (``data``) and the figure panels kept while scoring."""

    kind = "incontext"
    figure_dir = FIGURE_DIR

    def __init__(
        self, data: dict[str, Any], overlays: Mapping[tuple[str, str], Overlay] | None = None
    ) -> None:
        super().__init__(data)
        self.overlays = dict(overlays or {})

    def markdown(self) -> str:
        return markdown(self.data)

    def text(self) -> str:
        return text(self.data)

    def overlap_warning(self) -> str | None:
        """The fairness warning (queries seen in pretraining), or None."""
        return overlap_line(self.data)

    def figures(self, out: str | Path) -> list[Path]:
        """One overlay PNG per (network, class); ``data["figures"]`` lists them."""
        from .overlays import write_overlays

        paths = write_overlays(out, self.overlays)
        self.data["figures"] = paths
        return [Path(p) for p in paths]


def _p(value) -> str | None:
    """A p-value: three decimals, or scientific below 0.001."""
    if value is None:
        return None
    return f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def _ci(value, ci) -> str:
    if value is None:
        return "–"
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else fmt(value)


def summary_rows(results: dict) -> list[dict]:
    """One row per network and shot count: the headline means, CIs, misses, paired test."""
    tol = results["options"].get("tolerance_mm", 2.0)
    rows = []
    for s in results["summary"]:
        paired = (s.get("paired") or {}).get("dice")
        rows.append(
            {
                "network": s["network"],
                "shots": s["shots"],
                "Dice [95% CI]": _ci(s["mean_dice"], s.get("mean_dice_ci")),
                "HD95 mm": s["mean_hd95"],
                "HD95 median": s.get("median_hd95"),
                "ASD mm": s.get("mean_asd"),
                f"NSD@{tol:g}mm": s["mean_nsd"],
                "micro Dice": s.get("micro_dice"),
                "classes": s.get("classes_scored"),
                "structures": s["structures"],
                "misses": s.get("misses"),
                "FP absent": f"{s.get('false_positives', 0)}/{s.get('absent_rows', 0)}",
                "s/query": s["seconds_per_query"],
                "Δ Dice vs first [CI]": _ci(paired["diff"], paired["ci"]) if paired else "–",
                "p (Wilcoxon)": _p(paired["p"]) if paired else None,
            }
        )
    return rows


def summary_columns(results: dict) -> list[str]:
    tol = results["options"].get("tolerance_mm", 2.0)
    return [
        "network",
        "shots",
        "Dice [95% CI]",
        "HD95 mm",
        "HD95 median",
        "ASD mm",
        f"NSD@{tol:g}mm",
        "micro Dice",
        "classes",
        "structures",
        "misses",
        "FP absent",
        "s/query",
        "Δ Dice vs first [CI]",
        "p (Wilcoxon)",
    ]


SHORT_COLUMNS = ["network", "shots", "Dice [95% CI]", "HD95 mm", "misses", "FP absent", "s/query"]


def overlap_line(results: dict) -> str | None:
    """The fairness warning: evaluated scans a network was pretrained on."""
    overlap = results.get("pretraining_overlap") or []
    detail = results.get("pretraining_overlap_by_network") or {}
    unknown = [n for n, v in detail.items() if v == "not recorded"]
    if overlap:
        few = ", ".join(overlap[:8]) + (f" and {len(overlap) - 8} more" if len(overlap) > 8 else "")
        return (
            f"WARNING: {len(overlap)} query scan(s) were in the pretraining data "
            f"(by scan id or source hash): {few}; these numbers overstate what pretraining "
            "buys on unseen scans"
        )
    if unknown:
        return (
            f"WARNING: checkpoint(s) {', '.join(unknown)} do not record their pretraining "
            "scans, so overlap with this bank could not be checked"
        )
    return None


def _headline_line(results: dict) -> str:
    k0 = min(results["options"]["shots"])
    first = results["networks"][0]["name"] if results["networks"] else "–"
    return (
        f"Headline ({k0} shot(s), {first}): mean Dice {_ci(results['mean_dice'], results.get('mean_dice_ci'))}"
        f" = {results.get('headline', 'mean over datasets')}; micro mean over (class, query) "
        f"rows {_ci(results.get('micro_dice'), None)}"
    )


def text(results: dict) -> str:
    """Terminal tables: per network and k the headline, then per class Dice at the fewest k."""
    parts = [_headline_line(results), ""]
    parts.append(text_table(summary_rows(results), SHORT_COLUMNS))
    nets = list(dict.fromkeys(s["network"] for s in results["summary"]))
    k0 = min(results["options"]["shots"])
    per_class: dict[tuple[str, str], dict] = {}
    for s in results["summary"]:
        if s["shots"] != k0:
            continue
        for c in s["classes"]:
            row = per_class.setdefault(
                (c["dataset"], c["class"]), {"class": f"{c['dataset']}/{c['class']}"}
            )
            row[s["network"]] = c["dice"]
    parts.append(f"\n{k0}-shot Dice per class (mean over the queries holding it):")
    parts.append(text_table(list(per_class.values()), ["class", *nets]))
    for s in results["summary"]:
        if s.get("dropped") and s["network"] == nets[0]:
            parts.append(
                f"\n{s['shots']} shot(s): left out of the means (not scorable at every k): "
                + ", ".join(s["dropped"])
            )
    if results["not_scored"]:
        parts.append(f"\nnot scored: {len(results['not_scored'])} (reasons in results.json)")
    line = overlap_line(results)
    if line:
        parts.insert(0, line + "\n")
    return "\n".join(parts)


CLASS_COLUMNS = [
    "dataset",
    "class",
    "queries",
    "Dice [95% CI]",
    "hd95",
    "hd95_median",
    "asd",
    "nsd",
    "volume_ratio",
    "misses",
    "FP rate",
    "fp_ml_mean",
]

MAX_CASE_ROWS = 5000  # results.md stays readable; results.json has every row

CASE_COLUMNS = [
    "network",
    "shots",
    "repeat",
    "dataset",
    "class",
    "query",
    "references",
    "present",
    "dice",
    "hd95",
    "asd",
    "nsd",
    "pred_voxels",
    "gt_voxels",
    "fp_ml",
]


def markdown(results: dict) -> str:
    """``results.md``: overlap line, headline table, per network and k, paired, split, cases."""
    md = _markdown_head(results)
    for s in results["summary"]:
        md += _markdown_summary(s)
    md += _markdown_paired(results)
    if results.get("baselines"):
        md += ["", "## Baselines", ""]
        for name, stats in results["baselines"].items():
            md.append(
                f"- `{name}`: {stats.get('registrations')} registrations, "
                f"{stats.get('seconds_per_registration') or 0:.2f} s each, "
                f"{stats.get('fallbacks')} fallback(s)"
            )
    md += _markdown_thresholds(results)
    md += ["", "## References and queries", ""]
    for sp in results.get("references", []):
        refs = "; ".join(f"{n}: {', '.join(c['references'])}" for n, c in sp["classes"].items())
        md.append(
            f"- {sp['dataset']} (repeat {sp['repeat']}): references {refs}; queries "
            f"{', '.join(sp['queries']) or 'none'}"
        )
    md += _markdown_cases(results)
    if results["figures"]:
        md += ["", "## Figures", ""]
        md += [f"![{f}]({FIGURE_DIR}/{f.rsplit('/', 1)[-1]})" for f in results["figures"]]
    if results.get("run"):
        md += ["", "## Provenance", "", provenance_markdown(results["run"])]
    return "\n".join(md)


def _markdown_thresholds(results: dict) -> list[str]:
    """The reference-calibrated threshold of every (network, class, references)."""
    chosen = results.get("thresholds") or []
    if not chosen:
        return []
    md = ["", "## Thresholds", "", f"Rule: {results['options'].get('threshold')}.", ""]
    rows = [
        {**t, "references": ", ".join(t["references"]), "threshold": f"{t['threshold']:g}"}
        for t in chosen
    ]
    cols = ["network", "class", "references", "threshold"]
    return [*md, markdown_table(rows, cols)]


def _markdown_head(results: dict) -> list[str]:
    overlap = overlap_line(results)
    return [
        overlap
        or "Pretraining overlap: none of the query scans is in any checkpoint's "
        "pretraining data (by scan id and source hash).",
        "",
        "# In-context few-shot segmentation",
        "",
        _headline_line(results),
        "",
        markdown_table(summary_rows(results), summary_columns(results)),
        "",
        "Means per k cover the classes scorable at every requested k. A miss (structure "
        "present, nothing predicted) scores Dice 0 and 500 mm HD95/ASD. FP absent: queries "
        "without the class where a component of >= "
        f"{results['options'].get('fp_min_voxels')} voxels was predicted, of all such rows.",
    ]


def _markdown_summary(s: dict) -> list[str]:
    """One network at one k: per dataset and per class, and what was left out."""
    md = ["", f"## {s['network']}, {s['shots']} shot(s)", "", "Per dataset:", ""]
    md.append(markdown_table(s["datasets"], ["dataset", "mean_dice", "classes"]))
    rows = [
        {
            **c,
            "Dice [95% CI]": _ci(
                c["dice"], s.get("class_ci", {}).get(f"{c['dataset']}/{c['class']}")
            ),
            "FP rate": (f"{c['fp_queries']}/{c['absent_queries']}" if c["absent_queries"] else "–"),
        }
        for c in s["classes"]
    ]
    md += ["", "Per class:", "", markdown_table(rows, CLASS_COLUMNS)]
    if s.get("classes_volume_in_range") is not None:
        md += [
            "",
            f"Classes whose median predicted / true volume (volume_ratio) is within "
            f"[0.5, 2]: {s['classes_volume_in_range']} of {len(s['classes'])}.",
        ]
    if s.get("dropped"):
        md += ["", "Left out of these means: " + ", ".join(s["dropped"])]
    return md


def _markdown_paired(results: dict) -> list[str]:
    paired = [
        {
            "network": s["network"],
            "shots": s["shots"],
            "metric": m,
            "diff": p["diff"],
            "ci": f"[{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]" if p.get("ci") else "–",
            "p": _p(p["p"]),
            "pairs": p["pairs"],
        }
        for s in results["summary"]
        for m, p in (s.get("paired") or {}).items()
        if p
    ]
    if not paired:
        return []
    first = results["networks"][0]["name"] if results["networks"] else "the first network"
    return [
        "",
        f"## Paired differences vs {first}",
        "",
        "Headline statistic of (network − first) over the common (class, query) pairs, "
        "bootstrap 95 % interval, Wilcoxon signed-rank p over the pairs.",
        "",
        markdown_table(paired, ["network", "shots", "metric", "diff", "ci", "p", "pairs"]),
    ]


def _markdown_cases(results: dict) -> list[str]:
    cases = [{**r, "references": ", ".join(r["references"])} for r in results["structures"]]
    md = ["", "## Per case", ""]
    if len(cases) > MAX_CASE_ROWS:
        md += [
            f"The first {MAX_CASE_ROWS} of {len(cases)} rows; all of them are in results.json.",
            "",
        ]
    md.append(markdown_table(cases[:MAX_CASE_ROWS], CASE_COLUMNS))
    if results["not_scored"]:
        md += ["", "## Not scored", ""]
        md.append(
            markdown_table(results["not_scored"], ["dataset", "class", "shots", "query", "reason"])
        )
    return md
