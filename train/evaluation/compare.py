"""Several evaluation folders side by side (e.g. MASS-pretrained vs reconstruction vs scratch).

Each folder's ``results.json`` is reduced to its headline rows: in-context mean Dice /
HD95 / NSD per network and shot count, fine-tuning mean test Dice per network and label
fraction, probe AUROC and balanced accuracy per network. Rows of one kind share a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import EvaluationError
from .report import markdown_table, read_results

COLUMNS = {
    "incontext": ["folder", "network", "shots", "dice", "hd95", "nsd", "structures"],
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
                "hd95": s["mean_hd95"],
                "nsd": s["mean_nsd"],
                "structures": s["structures"],
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


def compare(folders: list[str]) -> dict[str, Any]:
    """``{"tables": {kind: rows}, "folders": [...]}`` for the given result folders."""
    if not folders:
        raise EvaluationError("give at least one evaluation output folder")
    tables: dict[str, list[dict[str, Any]]] = {}
    for folder in folders:
        try:
            results = read_results(folder)
        except FileNotFoundError as exc:
            raise EvaluationError(str(exc)) from exc
        tables.setdefault(kind_of(results), []).extend(headline_rows(folder, results))
    return {"evaluation": "compare", "folders": list(folders), "tables": tables}


def compare_markdown(result: dict[str, Any]) -> str:
    titles = {
        "incontext": "In-context few-shot segmentation (mean over structures)",
        "finetune": "Fine-tuning: mean test Dice per label fraction",
        "probe": "Frozen-encoder probe",
    }
    md = ["# Evaluations side by side", ""]
    for kind, rows in result["tables"].items():
        md += [f"## {titles[kind]}", "", markdown_table(rows, COLUMNS[kind]), ""]
    return "\n".join(md)
