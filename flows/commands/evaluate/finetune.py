"""`maskbank evaluate finetune`: label-efficient fine-tuning, pretrained vs from scratch."""

from __future__ import annotations

import argparse
import sys

from maskbank.flows.commands.evaluate._common import (
    add_common,
    device_of,
    fail,
    finish,
    load_networks,
    open_bank,
)

PROG = "maskbank evaluate finetune"
FIGURE = "dice_vs_fraction.png"
LR_GRID = "3e-4,1e-3,3e-3"  # = train.evaluation.finetune.LR_GRID (not imported: torch loads lazily)

DESCRIPTION = """\
Label-efficient fine-tuning on the labelled scans of BANK: does pretraining save labels?

The scans of each dataset are split (--split-seeds, one split per seed) into train /
validation / test (about 60/20/20, at least one scan each, so a dataset needs >= 3
labelled scans). For each --fractions share of the training scans (nested: the 10 %
scans are among the 20 % ones) the checkpoint is fine-tuned, and beside it the same
network from random weights ('scratch') with the same seed, steps, schedule, crops and
learning-rate grid, unless --no-baseline.

The network keeps its in-context form with a fixed set of classes (the label values of
the training scans): each class's task embedding starts as the mean embedding of its
training references (crops centred on the class), the all-ones global task of
pretraining rides along, and then every weight trains (adaptive Tversky + BCE) on random
crops, half of them centred near a labelled voxel, with flips. The recipe is the
fine-tuning one, not the pretraining one: AdamW with one-cycle warm-up, run once per
peak rate of --lr-grid; each network keeps the rate and step with the best validation
Dice (sliding windows, threshold 0.5, checked before training and every --val-every
steps). The test scans are scored once with those weights: Dice, HD95 and ASD (mm) and
normalised surface Dice at 2 mm per (class, test scan). The headline is the mean over
datasets of the mean over classes; with several split seeds, mean +- sd across them.

Writes OUT/results.json (every number, each split's scan ids per part and fraction,
every rate's validation score, the command, both networks, the bank fingerprint),
OUT/results.md and OUT/dice_vs_fraction.png. The default --steps 100 is a CPU demo
(minutes per run for the tiny preset, times the grid's rates; seconds per run are
reported); meaningful comparisons use thousands of steps on a GPU.
"""

EPILOG = """\
examples:
  maskbank evaluate finetune --checkpoint runs/tiny --bank eval-bank --out eval/finetune
  maskbank evaluate finetune --checkpoint runs/base --bank eval-bank --steps 5000 \\
      --val-every 250 --fractions 0.1,0.2,0.4,1.0 --split-seeds 0,1,2 --device cuda \\
      --out eval/base-ft
  maskbank evaluate finetune --checkpoint scratch --preset tiny --bank eval-bank \\
      --lr-grid 1e-3 --json
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tuning with 10-100 %% of the labels, vs the same network from scratch",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p, baseline="scratch")
    p.add_argument(
        "--fractions",
        default="0.1,0.2,0.4,1.0",
        help="comma list of shares of the training scans, each in (0, 1] (default 0.1,0.2,0.4,1.0)",
    )
    p.add_argument("--steps", type=int, default=100, help="training steps per run (default 100)")
    p.add_argument(
        "--val-every", type=int, default=25, help="steps between validations (default 25)"
    )
    p.add_argument("--batch-size", type=int, default=2, help="crops per step (default 2)")
    p.add_argument(
        "--lr-grid",
        default=LR_GRID,
        help="comma list of peak AdamW learning rates, one run each; every network keeps "
        "the rate with the best validation Dice (default %(default)s)",
    )
    p.add_argument(
        "--split-seeds",
        default="0",
        help="comma list of split seeds; each seed is one train/validation/test split, "
        "results give mean +- sd across them (default 0)",
    )
    p.add_argument("--window-batch", type=int, default=2, help="windows per forward pass")
    p.add_argument(
        "--save-model",
        default=None,
        metavar="DIR",
        help="keep the checkpoint's fine-tuned network (weights and class embeddings, "
        "selected on validation, largest fraction, first split seed) for `maskbank segment "
        "--checkpoint DIR`",
    )
    return p


def _numbers(text: str, kind: type, option: str, example: str) -> tuple:
    try:
        values = tuple(kind(s) for s in text.split(",") if s.strip())
    except ValueError:
        values = ()
    if not values:
        raise ValueError(f"{option} must be a comma list such as {example}, got {text!r}")
    return values


def parse_lr_grid(text: str) -> tuple[float, ...]:
    return _numbers(text, float, "--lr-grid", "3e-4,1e-3,3e-3")


def parse_split_seeds(text: str) -> tuple[int, ...]:
    return _numbers(text, int, "--split-seeds", "0,1,2")


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        fractions = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        fractions = ()
    if not fractions:
        raise ValueError(f"--fractions must be a comma list of numbers in (0, 1], got {text!r}")
    return fractions


def _networks(results: dict) -> list[str]:
    return list(dict.fromkeys(r["network"] for r in results["runs"]))


def _pm(mean: float | None, sd: float | None) -> str:
    """``mean ± sd`` (sd only with several split seeds)."""
    from maskbank.train.evaluation.report import fmt

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
    import numpy as np

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


def format_results(results: dict) -> str:
    """Terminal table: headline test Dice per fraction and network, chosen rates, seconds."""
    from maskbank.train.evaluation.report import text_table

    nets, rows = _by_fraction(results)
    seeds = results["split_seeds"]
    spread = f", mean ± sd over {len(seeds)} split seeds" if len(seeds) > 1 else ""
    return (
        f"test Dice (mean over datasets of the class means; weights and rate selected on "
        f"validation{spread}):\n" + text_table(rows, _main_columns(nets))
    )


def results_markdown(results: dict) -> str:
    from maskbank.train.evaluation.report import fmt, markdown_table, provenance_markdown

    nets, rows = _by_fraction(results)
    options, optim = results["options"], results["optim"]
    seeds = results["split_seeds"]
    md = ["# Label-efficient fine-tuning", ""]
    md.append(
        f"{options['steps']} steps per learning rate, batch {options['batch_size']}, crop "
        f"{results['crop']}, validation at step 0 and every {options['val_every']} step(s). "
        f"Optimiser: {optim['name']} (betas {optim['betas']}, weight decay "
        f"{optim['weight_decay']}, {optim['schedule']}, warm-up {optim['warmup_frac']}), "
        f"peak rates {', '.join(f'{lr:g}' for lr in optim['lr_grid'])}, each network "
        "keeping the rate and step with the best validation Dice; the same grid, steps and "
        "crops for every network."
    )
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
    md += ["", "## Runs", ""]
    md.append(
        markdown_table(
            [
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
            ],
            [
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
            ],
        )
    )
    md += ["", "## Learning-rate search (validation Dice of every rate)", ""]
    md.append(
        markdown_table(
            [
                {
                    "split seed": r["split_seed"],
                    "network": r["network"],
                    "fraction": f"{r['fraction']:g}",
                    **{f"lr {c['lr']:g}": fmt(c["val_dice"]) for c in r["lr_search"]},
                    "chosen": f"{r['lr']:g}",
                }
                for r in results["runs"]
            ],
            [
                "split seed",
                "network",
                "fraction",
                *(f"lr {lr:g}" for lr in optim["lr_grid"]),
                "chosen",
            ],
        )
    )
    for split in results["splits"]:
        md += ["", f"## Split (seed {split['seed']}, {split['by']})", ""]
        md.append(f"- validation: {', '.join(split['validation'])}")
        md.append(f"- test: {', '.join(split['test'])}")
        md += [f"- train {f}: {', '.join(ids)}" for f, ids in split["fractions"].items()]
    md += ["", "## Provenance", "", provenance_markdown(results["run"])]
    return "\n".join(md)


def _progress_line(run: dict) -> None:
    print(
        f"split {run['split_seed']} fraction {run['fraction']:g} {run['network']}: test Dice "
        f"{run['test']['mean_dice']:.3f} (lr {run['lr']:g}, best step {run['best_step']}, "
        f"{run['seconds']:.1f} s)",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from maskbank.train.evaluation.checkpoint import RANDOM, SCRATCH
    from maskbank.train.evaluation.errors import EvaluationError
    from maskbank.train.evaluation.finetune import FinetuneOptions, evaluate_finetune
    from maskbank.train.evaluation.report import line_plot

    opened = open_bank(PROG, args)
    if opened is None:
        return 2
    bank, ids = opened
    try:
        options = FinetuneOptions(
            fractions=parse_fractions(args.fractions),
            steps=args.steps,
            val_every=args.val_every,
            batch_size=args.batch_size,
            lr_grid=parse_lr_grid(args.lr_grid),
            split_seeds=parse_split_seeds(args.split_seeds),
            seed=args.seed,
            window_batch=args.window_batch,
            device=str(device_of(args.device)),
            progress=not args.no_progress,
        )
        loaded = load_networks(args, SCRATCH)
        nets = [("scratch" if n.source in (SCRATCH, RANDOM) else "pretrained", n) for n in loaded]
        results = evaluate_finetune(
            bank, nets, options, ids, on_run=_progress_line, save_model=args.save_model
        )
    except (EvaluationError, ValueError) as exc:
        return fail(PROG, exc)
    results["networks"] = {name: net.describe() for name, net in nets}
    out = finish(args, bank, loaded, results, results_markdown, format_results(results))
    if out is not None:
        series = {
            name: (
                [s["fraction"] for s in results["summary"] if s["network"] == name],
                [s["mean_dice"] for s in results["summary"] if s["network"] == name],
            )
            for name, _ in nets
        }
        line_plot(
            Path(out) / FIGURE,
            series,
            "share of training scans labelled",
            "mean test Dice",
            "Fine-tuning: Dice vs label fraction",
        )
    return 0
