"""Several evaluation folders side by side (e.g. MASS-pretrained vs reconstruction vs scratch).

Each folder's ``results.json`` is reduced to its headline rows: in-context mean Dice
(with its interval) / HD95 / ASD / NSD per network and shot count, fine-tuning mean test
Dice per network and label fraction, probe AUROC and balanced accuracy per network.
Rows of one kind share a table.

Numbers are comparable only when they measure the same thing, so ``compare`` refuses
folders whose bank fingerprint (data, label maps and label names), options or class
sets differ (within one kind), naming each difference; ``force=True`` puts them side by
side anyway and returns the differences with the tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import EvaluationError
from .report import markdown_table, read_results

COLUMNS = {
    "incontext": ["folder", "network", "shots", "dice", "dice CI", "hd95", "asd", "nsd", "classes"],
    "finetune": ["folder", "network", "fraction", "train_scans", "dice", "hd95", "nsd"],
    "probe": ["folder", "network", "target", "auroc", "balanced_accuracy"],
}


def kind_of(results: dict[str, Any]) -> str:
    kind = results.get("evaluation")
    if kind not in COLUMNS:
        raise EvaluationError(f"unknown evaluation kind {kind!r} in results.json")
    return str(kind)


def headline_rows(folder: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows one results.json contributes to its kind's table."""
    kind = kind_of(results)
    name = Path(folder).name or str(folder)
    if kind == "incontext":
        return [
            {
                "folder": name,
                "network": s["network"],
                "shots": s["shots"],
                "dice": s["mean_dice"],
                "dice CI": (
                    f"[{s['mean_dice_ci'][0]:.3f}, {s['mean_dice_ci'][1]:.3f}]"
                    if s.get("mean_dice_ci")
                    else None
                ),
                "hd95": s["mean_hd95"],
                "asd": s.get("mean_asd"),
                "nsd": s["mean_nsd"],
                "classes": s.get("classes_scored", s.get("structures")),
            }
            for s in results["summary"]
        ]
    if kind == "finetune":
        rows = []
        for r in results["runs"]:
            test = r.get("test", {})
            rows.append(
                {
                    "folder": name,
                    "network": r["network"],
                    "fraction": r["fraction"],
                    "train_scans": len(r.get("train_scans", [])),
                    "dice": test.get("mean_dice"),
                    "hd95": test.get("mean_hd95"),
                    "nsd": test.get("mean_nsd"),
                }
            )
        return rows
    return [
        {
            "folder": name,
            "network": n["network"],
            "target": results.get("target"),
            "auroc": n.get("auroc"),
            "balanced_accuracy": n.get("balanced_accuracy"),
        }
        for n in results["networks"]
    ]


def _fingerprint(results: dict[str, Any]) -> str | None:
    return ((results.get("run") or {}).get("bank") or {}).get("fingerprint")


def _class_set(results: dict[str, Any]) -> list | None:
    classes = results.get("classes")
    if classes is None:
        return None
    return sorted(
        (str(c.get("dataset")), c.get("value"), str(c.get("class", c.get("name"))))
        if isinstance(c, dict)
        else (str(c), None, str(c))
        for c in classes
    )


def _differences(loaded: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """What differs between folders: the bank (all), options and classes (per kind)."""
    diffs = []
    first_name, first = loaded[0]
    for name, res in loaded[1:]:
        a, b = _fingerprint(first), _fingerprint(res)
        if a != b:
            diffs.append(
                f"bank fingerprint: {first_name} {a or 'not recorded'} vs {name} "
                f"{b or 'not recorded'} (another bank, or its labels or label names changed)"
            )
    by_kind: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, res in loaded:
        by_kind.setdefault(kind_of(res), []).append((name, res))
    for group in by_kind.values():
        (ref_name, ref), rest = group[0], group[1:]
        for name, res in rest:
            opts_a, opts_b = ref.get("options") or {}, res.get("options") or {}
            for key in sorted(set(opts_a) | set(opts_b)):
                if opts_a.get(key) != opts_b.get(key):
                    diffs.append(
                        f"option {key}: {ref_name} {opts_a.get(key, 'not recorded')!r} vs "
                        f"{name} {opts_b.get(key, 'not recorded')!r}"
                    )
            ca, cb = _class_set(ref), _class_set(res)
            if ca != cb:
                if ca is None or cb is None:
                    diffs.append(f"classes: recorded in only one of {ref_name}, {name}")
                else:
                    only_a = [f"{d}/{n}" for d, _, n in ca if (d, _, n) not in cb]
                    only_b = [f"{d}/{n}" for d, _, n in cb if (d, _, n) not in ca]
                    diffs.append(
                        f"classes: only in {ref_name}: {only_a or 'none'}; only in {name}: "
                        f"{only_b or 'none'}"
                    )
    return diffs


def compare(folders: list[str], force: bool = False) -> dict[str, Any]:
    """``{"tables": {kind: rows}, "folders", "differences"}`` for the given result folders.

    Raises when the folders differ in bank, options or classes, unless ``force``.
    """
    if not folders:
        raise EvaluationError("give at least one evaluation output folder")
    loaded = []
    for folder in folders:
        try:
            loaded.append((str(folder), read_results(folder)))
        except FileNotFoundError as exc:
            raise EvaluationError(str(exc)) from exc
    diffs = _differences(loaded)
    if diffs and not force:
        raise EvaluationError(
            "these evaluations are not comparable: "
            + "; ".join(diffs[:12])
            + (f"; and {len(diffs) - 12} more" if len(diffs) > 12 else "")
            + ". Evaluate on the same bank with the same options, or pass --force to put "
            "them side by side anyway"
        )
    tables: dict[str, list[dict[str, Any]]] = {}
    for folder, results in loaded:
        tables.setdefault(kind_of(results), []).extend(headline_rows(folder, results))
    return {
        "evaluation": "compare",
        "folders": list(folders),
        "tables": tables,
        "differences": diffs,
    }


def compare_markdown(result: dict[str, Any]) -> str:
    titles = {
        "incontext": "In-context few-shot segmentation (mean over datasets of class means)",
        "finetune": "Fine-tuning: mean test Dice per label fraction",
        "probe": "Frozen-encoder probe",
    }
    md = ["# Evaluations side by side", ""]
    if result.get("differences"):
        md += ["**Compared with --force despite these differences:**", ""]
        md += [f"- {d}" for d in result["differences"]] + [""]
    for kind, rows in result["tables"].items():
        md += [f"## {titles[kind]}", "", markdown_table(rows, COLUMNS[kind]), ""]
    return "\n".join(md)
