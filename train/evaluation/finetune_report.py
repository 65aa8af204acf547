"""The fine-tuning tables and figure: ``results.md``, the terminal table, Dice vs fraction.

``FinetuneResult`` is what ``finetune.run`` returns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .report import fmt, line_plot, markdown_table, provenance_markdown, text_table
from .result import Result

FIGURE = "dice_vs_fraction.png"


class FinetuneResult(Result):
    """The fine-tuning results: every run, and per fraction and network the summary."""

    kind = "finetune"

    def markdown(self) -> str:
        return markdown(self.data)

    def text(self) -> str:
        return text(self.data)

    def figures(self, out: str | Path) -> list[Path]:
        """``dice_vs_fraction.png`` in ``out``."""
        Path(out).mkdir(parents=True, exist_ok=True)
        return [plot(Path(out) / FIGURE, self.data)]


def _networks(results: dict) -> list[str]:
    return list(dict.fromkeys(r["network"] for r in results["runs"]))


def _pm(mean: float | None, sd: float | None) -> str:
    """``mean ± sd`` (sd only with several split seeds)."""
    return fmt(mean) if sd is None else f"{fmt(mean)} ± {fmt(sd)}"


def _by_fraction(results: dict) -> tuple[list[str], list[dict]]:
    """Networks in order, and one row per fraction: each network's headline (± sd over seeds),
    its chosen rate per seed and its seconds per run (every rate of the grid)."""
    nets = _networks(results)
    rows: dict[float, dict] = {}
    for s in results["summary"]:
        row = rows.setdefault(
            s["fraction"],
            {"fraction": f"{s['fraction']:g}", "train scans": f"{s['train_scans']:g}"},
        )
        row[s["network"]] = _pm(s["mean_dice"], s["sd_dice"])
        row[f"{s['network']} lr"] = ", ".join(f"{lr:g}" for lr in s["lr"].values())
    seconds: dict[tuple[float, str], list[float]] = {}
    for r in results["runs"]:  # all rates of the grid; mean over split seeds
        seconds.setdefault((r["fraction"], r["network"]), []).append(r["seconds"])
    for (fraction, network), v in seconds.items():
        rows[fraction][f"{network} s"] = sum(v) / len(v)
    return nets, list(rows.values())


def _main_columns(nets: list[str]) -> list[str]:
    return [
        "fraction",
        "train scans",
        *nets,
        *(f"{n} lr" for n in nets),
        *(f"{n} s" for n in nets),
    ]


def _per_group(results: dict, nets: list[str], part: str, column: str) -> list[dict]:
    """Test Dice per (fraction, class or dataset), mean ± sd over the seeds that have it."""
    values: dict[tuple[float, str], dict[str, list[float]]] = {}
    for r in results["runs"]:
        for key, c in r["test"][part].items():
            values.setdefault((r["fraction"], key), {}).setdefault(r["network"], []).append(
                c["dice"]
            )
    rows = []
    for (fraction, key), by_net in values.items():
        row = {"fraction": f"{fraction:g}", column: key}
        for n, v in by_net.items():
            row[n] = _pm(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None)
        rows.append(row)
    return rows


def text(results: dict) -> str:
    """Terminal table: headline test Dice per fraction and network, chosen rates, seconds."""
    nets, rows = _by_fraction(results)
    seeds = results["split_seeds"]
    spread = f", mean ± sd over {len(seeds)} split seeds" if len(seeds) > 1 else ""
    return (
        f"test Dice (mean over datasets of the class means; weights and rate selected on "
        f"validation{spread}):\n" + text_table(rows, _main_columns(nets))
    )


def markdown(results: dict) -> str:
    """``results.md``: the recipe, the headline per fraction, per dataset and class, runs."""
    nets, rows = _by_fraction(results)
    seeds = results["split_seeds"]
    md = ["# Label-efficient fine-tuning", "", _recipe_line(results)]
    md += [
        "",
        f"Test Dice: {results['headline']}"
        + (
            f"; mean ± sd over split seeds {', '.join(map(str, seeds))}."
            if len(seeds) > 1
            else f" (one split, seed {seeds[0]}: no spread; add --split-seeds 0,1,2)."
        ),
        "",
        markdown_table(rows, _main_columns(nets)),
    ]
    md += ["", f"![Dice vs label fraction]({FIGURE})", "", "## Per dataset (test Dice)", ""]
    md.append(
        markdown_table(
            _per_group(results, nets, "datasets", "dataset"), ["fraction", "dataset", *nets]
        )
    )
    md += ["", "## Per class (test Dice)", ""]
    md.append(
        markdown_table(_per_group(results, nets, "classes", "class"), ["fraction", "class", *nets])
    )
    md += ["", "## Runs", "", markdown_table(_run_rows(results), RUN_COLUMNS)]
    md += ["", "## Learning-rate search (validation Dice of every rate)", ""]
    md.append(markdown_table(*_search_table(results)))
    for split in results["splits"]:
        md += ["", f"## Split (seed {split['seed']}, {split['by']})", ""]
        md.append(f"- validation: {', '.join(split['validation'])}")
        md.append(f"- test: {', '.join(split['test'])}")
        md += [f"- train {f}: {', '.join(ids)}" for f, ids in split["fractions"].items()]
    if results.get("run"):
        md += ["", "## Provenance", "", provenance_markdown(results["run"])]
    return "\n".join(md)


def _recipe_line(results: dict) -> str:
    options, optim = results["options"], results["optim"]
    return (
        f"{options['steps']} steps per learning rate, batch {options['batch_size']}, crop "
        f"{results['crop']}, validation at step 0 and every {options['val_every']} step(s). "
        f"Optimiser: {optim['name']} (betas {optim['betas']}, weight decay "
        f"{optim['weight_decay']}, {optim['schedule']}, warm-up {optim['warmup_frac']}), "
        f"peak rates {', '.join(f'{lr:g}' for lr in optim['lr_grid'])}, each network "
        "keeping the rate and step with the best validation Dice; the same grid, steps and "
        "crops for every network."
    )


RUN_COLUMNS = [
    "split seed",
    "network",
    "fraction",
    "lr",
    "best step",
    "val Dice",
    "test Dice",
    "HD95 (mm)",
    "ASD (mm)",
    "NSD",
    "untrained classes",
]


def _run_rows(results: dict) -> list[dict]:
    return [
        {
            "split seed": r["split_seed"],
            "network": r["network"],
            "fraction": f"{r['fraction']:g}",
            "lr": f"{r['lr']:g}",
            "best step": r["best_step"],
            "val Dice": r["val_dice"],
            "test Dice": r["test"]["mean_dice"],
            "HD95 (mm)": r["test"]["mean_hd95"],
            "ASD (mm)": r["test"]["mean_asd"],
            "NSD": r["test"]["mean_nsd"],
            "untrained classes": ", ".join(r["untrained_classes"]) or "–",
        }
        for r in results["runs"]
    ]


def _search_table(results: dict) -> tuple[list[dict], list[str]]:
    rows = [
        {
            "split seed": r["split_seed"],
            "network": r["network"],
            "fraction": f"{r['fraction']:g}",
            **{f"lr {c['lr']:g}": fmt(c["val_dice"]) for c in r["lr_search"]},
            "chosen": f"{r['lr']:g}",
        }
        for r in results["runs"]
    ]
    grid = [f"lr {lr:g}" for lr in results["optim"]["lr_grid"]]
    return rows, ["split seed", "network", "fraction", *grid, "chosen"]


def plot(path: str | Path, results: dict) -> Path:
    """Mean test Dice against the label fraction, one line per network."""
    series = {
        name: (
            [s["fraction"] for s in results["summary"] if s["network"] == name],
            [s["mean_dice"] for s in results["summary"] if s["network"] == name],
        )
        for name in _networks(results)
    }
    return line_plot(
        path,
        series,
        "share of training scans labelled",
        "mean test Dice",
        "Fine-tuning: Dice vs label fraction",
    )
