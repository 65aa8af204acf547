"""`maskbank evaluate finetune`: label-efficient fine-tuning, pretrained vs from scratch."""

from __future__ import annotations

import argparse
import sys

from maskbank.flows.commands.evaluate._common import (
    add_common,
    command_line,
    device_of,
    fail,
    finish,
    load_networks,
    open_bank,
)

PROG = "maskbank evaluate finetune"
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


def _progress_line(run: dict) -> None:
    print(
        f"split {run['split_seed']} fraction {run['fraction']:g} {run['network']}: test Dice "
        f"{run['test']['mean_dice']:.3f} (lr {run['lr']:g}, best step {run['best_step']}, "
        f"{run['seconds']:.1f} s)",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    from maskbank.train.evaluation import finetune
    from maskbank.train.evaluation.checkpoint import SCRATCH
    from maskbank.train.evaluation.errors import EvaluationError

    opened = open_bank(PROG, args)
    if opened is None:
        return 2
    bank, ids = opened
    try:
        options = finetune.FinetuneOptions(
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
        result = finetune.run(
            bank,
            load_networks(args, SCRATCH),
            options,
            scan_ids=ids,
            command=command_line(args),
            on_run=_progress_line,
            save_model=args.save_model,
        )
    except (EvaluationError, ValueError) as exc:
        return fail(PROG, exc)
    finish(args, result)
    return 0
