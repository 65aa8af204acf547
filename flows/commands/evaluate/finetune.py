"""`maskbank evaluate finetune`: label-efficient fine-tuning, pretrained vs from scratch."""

from __future__ import annotations

import argparse
import sys

from flows.commands.evaluate._common import (
    add_common,
    device_of,
    fail,
    finish,
    load_networks,
    open_bank,
)

PROG = "maskbank evaluate finetune"
FIGURE = "dice_vs_fraction.png"

DESCRIPTION = """\
Label-efficient fine-tuning on the labelled scans of BANK: does pretraining save labels?

The scans of each dataset are split once (--split-seed) by scan into train / validation
/ test (about 60/20/20, at least one scan each, so a dataset needs >= 3 labelled scans).
For each --fractions share of the training scans (nested: the 10 % scans are among the
20 % ones) the checkpoint is fine-tuned, and beside it the same network from random
weights ('scratch') with the same seed, steps, schedule and crops, unless --no-baseline.

The network keeps its in-context form with a fixed set of classes (the label values of
the training scans): each class's task embedding starts as the mean embedding of its
training references (crops centred on the class), the all-ones global task of
pretraining rides along, and then every weight trains (adaptive Tversky + BCE, AdamW,
one-cycle) on random crops, half of them centred near a labelled voxel, with flips.
Validation Dice (sliding windows, threshold 0.5) before training and every --val-every
steps picks the weights; the test scans are scored once with them: Dice, HD95 (mm) and
normalised surface Dice at 2 mm per class, over the test scans holding it.

Writes OUT/results.json (every number, the split's scan ids per part and fraction, the
command, both networks, the bank fingerprint), OUT/results.md and OUT/dice_vs_fraction.png.
The default --steps 100 is a CPU demo (minutes per run for the tiny preset; seconds per
run are reported); meaningful comparisons use thousands of steps on a GPU.
"""

EPILOG = """\
examples:
  maskbank evaluate finetune --checkpoint runs/tiny --bank eval-bank --out eval/finetune
  maskbank evaluate finetune --checkpoint runs/base --bank eval-bank --steps 5000 \\
      --val-every 250 --fractions 0.1,0.2,0.4,1.0 --device cuda --out eval/base-ft
  maskbank evaluate finetune --checkpoint scratch --preset tiny --bank eval-bank --json
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
        "--lr", type=float, default=None, help="peak learning rate (default: the preset's)"
    )
    p.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/validation/test split"
    )
    p.add_argument("--window-batch", type=int, default=2, help="windows per forward pass")
    return p


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        fractions = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        fractions = ()
    if not fractions:
        raise ValueError(f"--fractions must be a comma list of numbers in (0, 1], got {text!r}")
    return fractions


def _by_fraction(results: dict) -> tuple[list[str], list[dict]]:
    """Networks in order, and one row per fraction with each network's mean test Dice."""
    nets = list(dict.fromkeys(r["network"] for r in results["runs"]))
    rows: dict[float, dict] = {}
    for r in results["runs"]:
        row = rows.setdefault(
            r["fraction"], {"fraction": f"{r['fraction']:g}", "train scans": len(r["train_scans"])}
        )
        row[r["network"]] = r["test"]["mean_dice"]
        row[f"{r['network']} s"] = r["seconds"]
    return nets, list(rows.values())


def _per_class(results: dict, nets: list[str]) -> list[dict]:
    rows: dict[tuple[float, str], dict] = {}
    for r in results["runs"]:
        for key, c in r["test"]["classes"].items():
            row = rows.setdefault(
                (r["fraction"], key), {"fraction": f"{r['fraction']:g}", "class": key}
            )
            row[r["network"]] = c["dice"]
    return list(rows.values())


def format_results(results: dict) -> str:
    """Terminal table: mean test Dice per fraction and network, and seconds per run."""
    from train.evaluation.report import text_table

    nets, rows = _by_fraction(results)
    cols = ["fraction", "train scans", *nets, *(f"{n} s" for n in nets)]
    return "mean test Dice (selected on validation):\n" + text_table(rows, cols)


def results_markdown(results: dict) -> str:
    from train.evaluation.report import markdown_table, provenance_markdown

    nets, rows = _by_fraction(results)
    split = results["split"]
    md = ["# Label-efficient fine-tuning", ""]
    md.append(
        f"{results['options']['steps']} steps per run, batch {results['options']['batch_size']}, "
        f"crop {results['crop']}, validation at step 0 and every "
        f"{results['options']['val_every']} step(s); "
        "mean test Dice of the weights with the best validation Dice."
    )
    md += ["", markdown_table(rows, ["fraction", "train scans", *nets, *(f"{n} s" for n in nets)])]
    md += ["", f"![Dice vs label fraction]({FIGURE})", "", "## Per class (test Dice)", ""]
    md.append(markdown_table(_per_class(results, nets), ["fraction", "class", *nets]))
    md += ["", "## Runs", ""]
    md.append(
        markdown_table(
            [
                {
                    "network": r["network"],
                    "fraction": f"{r['fraction']:g}",
                    "best step": r["best_step"],
                    "val Dice": r["val_dice"],
                    "test Dice": r["test"]["mean_dice"],
                    "HD95 (mm)": r["test"]["mean_hd95"],
                    "NSD@2mm": r["test"]["mean_nsd"],
                    "untrained classes": ", ".join(r["untrained_classes"]) or "–",
                }
                for r in results["runs"]
            ],
            [
                "network",
                "fraction",
                "best step",
                "val Dice",
                "test Dice",
                "HD95 (mm)",
                "NSD@2mm",
                "untrained classes",
            ],
        )
    )
    md += ["", f"## Split (seed {split['seed']}, by scan, per dataset)", ""]
    md.append(f"- validation: {', '.join(split['validation'])}")
    md.append(f"- test: {', '.join(split['test'])}")
    md += [f"- train {f}: {', '.join(ids)}" for f, ids in split["fractions"].items()]
    md += ["", "## Provenance", "", provenance_markdown(results["run"])]
    return "\n".join(md)


def _progress_line(run: dict) -> None:
    print(
        f"fraction {run['fraction']:g} {run['network']}: test Dice "
        f"{run['test']['mean_dice']:.3f} (best step {run['best_step']}, "
        f"{run['seconds']:.1f} s)",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from train.evaluation.checkpoint import RANDOM, SCRATCH
    from train.evaluation.errors import EvaluationError
    from train.evaluation.finetune import FinetuneOptions, evaluate_finetune
    from train.evaluation.report import line_plot

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
            lr=args.lr,
            split_seed=args.split_seed,
            seed=args.seed,
            window_batch=args.window_batch,
            device=str(device_of(args.device)),
            progress=not args.no_progress,
        )
        loaded = load_networks(args, SCRATCH)
        nets = [("scratch" if n.source in (SCRATCH, RANDOM) else "pretrained", n) for n in loaded]
        results = evaluate_finetune(bank, nets, options, ids, on_run=_progress_line)
    except (EvaluationError, ValueError) as exc:
        return fail(PROG, exc)
    results["networks"] = {name: net.describe() for name, net in nets}
    out = finish(args, bank, loaded, results, results_markdown, format_results(results))
    if out is not None:
        series = {
            name: (
                [r["fraction"] for r in results["runs"] if r["network"] == name],
                [r["test"]["mean_dice"] for r in results["runs"] if r["network"] == name],
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
