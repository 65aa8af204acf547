"""What every evaluation writes: DIR/results.json, DIR/results.md and PNG figures.

``results.json`` holds every number plus what is needed to reproduce it: the exact
command, the checkpoints' configs and SHA-256, and the bank's fingerprint.
``results.md`` holds the same as tables for people. ``compare`` puts several result
folders side by side (e.g. MASS-pretrained vs reconstruction vs scratch).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluation_fingerprint(bank) -> str:
    """The bank's data fingerprint plus every scan's label map (stored CRC) and label names.

    Two evaluations are comparable only on the same labels: the pretraining fingerprint
    (ids, sources, shapes, proposal counts) does not see a relabelled or renamed bank.
    """
    from maskbank.train.pair_sampler import bank_fingerprint

    labels = []
    for row in bank.index:
        if not row.get("has_label"):
            continue
        attrs = bank.scan(row["scan_id"]).attrs
        arrays = (attrs.get("maskbank") or {}).get("arrays") or {}
        labels.append(
            [
                row["scan_id"],
                (arrays.get("label") or {}).get("crc32"),
                attrs.get("label_names"),
                row.get("dataset"),
            ]
        )
    text = json.dumps([bank_fingerprint(bank), labels], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(runner: Any) -> dict[str, Any]:
    """A network's description, or a baseline's (its label and settings)."""
    if hasattr(runner, "describe"):
        return runner.describe()
    return {
        "checkpoint": None,
        "label": runner.label,
        "sha256": None,
        "preset": "–",
        "weights": "–",
        "pretext": "baseline",
        "config": getattr(runner, "config", {}),
    }


def run_record(argv: Sequence[str] | None, bank, networks: Sequence) -> dict[str, Any]:
    """The provenance block: command, time, bank fingerprint, each network's description."""
    return {
        "command": list(argv) if argv is not None else list(sys.argv),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "bank": {"location": str(bank.location), "fingerprint": evaluation_fingerprint(bank)},
        "networks": [describe(n) for n in networks],
    }


def write_results(out: str | Path, results: dict[str, Any], markdown: str) -> Path:
    """Write ``results.json`` and ``results.md`` into ``out`` (created); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RESULTS_JSON}.tmp"
    tmp.write_text(json.dumps(_clean(results), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(out / RESULTS_JSON)
    (out / RESULTS_MD).write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return out


def read_results(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / RESULTS_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {folder} an evaluation output folder?")
    return json.loads(path.read_text(encoding="utf-8"))


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (missing cells shown as –)."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """The same table aligned for a terminal."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def provenance_markdown(record: dict[str, Any]) -> str:
    nets = "\n".join(
        f"- `{n['label']}`: preset {n['preset']}, weights {n['weights']}, pretext "
        f"{n['pretext']}" + (f", sha256 `{n['sha256'][:16]}`" if n.get("sha256") else "")
        for n in record["networks"]
    )
    return (
        f"Command: `{' '.join(record['command'])}`\n\n"
        f"Bank: `{record['bank']['location']}` (fingerprint `{record['bank']['fingerprint']}`)\n\n"
        f"Networks:\n{nets}\n"
    )


def line_plot(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """A small PNG line plot (e.g. Dice vs label fraction), one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
