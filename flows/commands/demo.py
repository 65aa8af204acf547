"""`maskbank demo`: the README's main job, end to end on sample scans.

Stages run in order and share one context dict; each returns an exit code.
Stages (prepare, proposals, a tiny pretraining run, evaluation) plug in by appending to
`STAGES` -- see the comment there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from maskbank.flows.commands._prefect_env import apply_cli_defaults
from maskbank.flows.commands.options import add_workers_option

STAGE_ORDER = ("prepare", "propose", "pretrain", "evaluate")  # the functions are in STAGES below


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="build a bank from sample scans end to end and print its summary",
        description="Build a bank from sample scans: the real ones in ../shared/data when "
        "present (plus a synthetic PET phantom, since no real PET is public), otherwise "
        "synthetic CT/MR/PET phantoms written as NIfTI into OUT/inputs. Runs `prepare` "
        "into OUT/bank and prints the bank summary, makes the mask proposals and prints "
        "their quality against the scans' labels, then pretrains the `tiny` in-context "
        "network on the CPU for --steps steps (OUT/pretrain) on every scan except the "
        "labelled ones the evaluation scores, and prints its loss curve, and ends with the "
        "answer: 1-shot in-context segmentation of the labelled structures in those unseen "
        "scans by the pretrained network beside atlas registration and the untrained floor "
        "(OUT/evaluate: results.md, results.json, figures). "
        "Re-running skips finished prepare/propose work. Exit status as for `maskbank prepare`.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for inputs and bank")
    p.add_argument("--spacing", default="1.5", metavar="MM", help="target spacing (default 1.5)")
    add_workers_option(p, default=2)
    p.add_argument(
        "--synthetic", action="store_true", help="use phantoms even when real scans exist"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--steps",
        type=int,
        default=1000,
        metavar="N",
        help="tiny pretraining steps (default 1000: a minute or two on a CPU, enough for the "
        "pretrained network to beat the untrained floor in the evaluation)",
    )
    p.add_argument(
        "--until",
        choices=STAGE_ORDER,
        default="evaluate",
        help="stop after this stage (default: evaluate, i.e. run everything)",
    )
    return p


def stage_prepare(args: argparse.Namespace, ctx: dict) -> int:
    from maskbank.flows.commands.info import format_summary
    from maskbank.flows.demo_bank import write_inputs
    from maskbank.flows.inputs import parse_spacing
    from maskbank.flows.prepare import prepare_bank
    from maskbank.flows.report import format_prepare_report
    from maskbank.pipeline.config import PrepareConfig

    manifest = write_inputs(ctx["out"], args.synthetic)
    config = PrepareConfig(spacing=parse_spacing(args.spacing))
    report = prepare_bank(
        inputs=[str(manifest)],
        bank=str(ctx["bank"]),
        config=config.to_dict(),
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(format_prepare_report(report))
    from maskbank.bank import Bank

    print()
    print(format_summary(Bank.open(ctx["bank"]).summary()))
    ctx["prepare_report"] = report
    return 1 if report["counts"].get("failed") else 0


def stage_propose(args: argparse.Namespace, ctx: dict) -> int:
    """Mask proposals for every scan, then their quality against the labelled scans."""
    from maskbank.bank import Bank
    from maskbank.flows.commands.proposals_quality import bank_quality, format_table
    from maskbank.flows.propose import propose_bank
    from maskbank.flows.report import format_propose_report
    from maskbank.pipeline.proposals.engine import ProposalConfig

    report = propose_bank(
        bank=str(ctx["bank"]),
        config=ProposalConfig().to_dict(),
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(format_propose_report(report))
    print()
    print(format_table(bank_quality(Bank.open(ctx["bank"]))))
    return 1 if report["counts"].get("failed") else 0


def sparkline(values: list[float], width: int = 60) -> str:
    """One-line picture of a curve (the loss), resampled to ``width`` characters."""
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    idx = [round(i * (len(values) - 1) / max(width - 1, 1)) for i in range(min(width, len(values)))]
    pts = [values[i] for i in idx]
    lo, hi = min(pts), max(pts)
    span = (hi - lo) or 1.0
    return "".join(bars[min(7, int((v - lo) / span * 7.999))] for v in pts)


def pretraining_scans(bank_path: Path) -> tuple[list[str], list[str]]:
    """(scans to pretrain on, evaluation queries left out): the evaluation never scores a
    scan the network was pretrained on. The references may stay: their labels are given
    to the network at evaluation anyway, and pretraining never sees a label."""
    from maskbank.bank import Bank
    from maskbank.train.evaluation.incontext import query_scan_ids

    bank = Bank.open(bank_path)
    try:
        queries = query_scan_ids(bank)
    except ValueError:  # no labelled classes: nothing will be evaluated, pretrain on all
        queries = []
    return [s for s in sorted(bank.scan_ids) if s not in set(queries)], queries


def stage_pretrain(args: argparse.Namespace, ctx: dict) -> int:
    """A short CPU pretraining of the `tiny` preset on all but the evaluation queries."""
    import json
    from dataclasses import replace

    from maskbank.train import pretrain
    from maskbank.train.run import USAGE_ERRORS, usage_error
    from maskbank.train.run_config import TrainConfig

    run_dir = ctx["out"] / "pretrain"
    scans, queries = pretraining_scans(ctx["bank"])
    print(
        f"pretraining on {len(scans)} scans; the {len(queries)} labelled scans the evaluation "
        f"scores as queries are left out: {', '.join(queries) or 'none'}"
    )
    tiny = TrainConfig.load("tiny")
    config = replace(
        tiny,
        # The held-out queries double as validation scans: the pretext's Dice on pairs
        # from scans it never trained on, every train.val_every steps.
        data=replace(tiny.data, scans=tuple(scans), val_scans=tuple(queries) or None),
        train=replace(
            tiny.train,
            max_steps=args.steps,
            progress=not args.no_progress,
            ckpt_every=max(20, args.steps // 4),  # a few checkpoints, not 50
        ),
    )
    try:
        summary = pretrain(config, ctx["bank"], run_dir)
    except USAGE_ERRORS as exc:
        return usage_error(exc)
    print(summary.outcome, file=sys.stderr)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [float(r["loss"]) for r in rows if "loss" in r]
    if losses:
        k = max(1, len(losses) // 10)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"\npretraining loss over {len(losses)} steps: {sparkline(losses)}")
        print(f"mean loss of the first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    val = [(int(r["step"]), float(r["val_dice"])) for r in rows if "val_dice" in r]
    if val:
        curve = ", ".join(f"{step}: {dice:.3f}" for step, dice in val)
        print(f"held-out pair Dice (scans left out of pretraining) by step: {curve}")
        keys = ("val_seen_share", "val_dice_seen", "val_dice_view")
        last = next((r for r in reversed(rows) if all(r.get(k) is not None for k in keys)), None)
        if last is not None:
            print(
                f"  the reference crop shows {last['val_seen_share']:.0%} of a query target on "
                f"average: an exact copy of what it shows would score {last['val_dice_seen']:.3f}; "
                f"the network scores {last['val_dice_view']:.3f} inside that view"
            )
    if losses:
        print(f"run directory: {run_dir} (tensorboard --logdir {run_dir / 'tb'})")
    return 0


def stage_evaluate(args: argparse.Namespace, ctx: dict) -> int:
    """1-shot in-context segmentation: the pretrained `tiny`, atlas registration, the floor
    (``train.evaluation.incontext.run``; OUT/evaluate/incontext: results, figures)."""
    from maskbank.bank import Bank
    from maskbank.flows.commands.evaluate._common import command_line, device_of
    from maskbank.train.evaluation import incontext
    from maskbank.train.evaluation.errors import EvaluationError

    out = ctx["out"] / "evaluate" / "incontext"
    print(
        "\n1-shot in-context segmentation of the labelled structures on scans left out of "
        "pretraining (pretrained vs atlas registration vs untrained floor; the headline is "
        "the mean over datasets of the class means, with its 95 % bootstrap interval):"
    )
    try:
        networks = incontext.load_runners([str(ctx["out"] / "pretrain"), "registration"])
        options = incontext.InContextOptions(shots=(1,), device=str(device_of("auto")))
        result = incontext.run(
            Bank.open(ctx["bank"]),
            networks,
            options,
            progress=not args.no_progress,
            command=command_line(args),
        )
    except (EvaluationError, ValueError) as exc:
        print(f"maskbank demo: evaluation: error: {exc}", file=sys.stderr)
        return 2
    warning = result.overlap_warning()
    if warning:
        print(f"maskbank demo: {warning}", file=sys.stderr)
    result.write(out)
    print(result.text())
    print(f"\nresults: {out / 'results.md'} (all numbers: results.json)")
    print(f"overlays per class: {out / 'figures'}")
    return 0


# Stages share ctx["out"], ctx["bank"] and what earlier stages stored.
STAGES: list[tuple[str, Callable[[argparse.Namespace, dict], int]]] = [
    ("prepare", stage_prepare),
    ("propose", stage_propose),
    ("pretrain", stage_pretrain),
    ("evaluate", stage_evaluate),
]
assert tuple(name for name, _ in STAGES) == STAGE_ORDER


def run(args: argparse.Namespace) -> int:
    apply_cli_defaults()
    out = Path(args.out).expanduser().resolve()
    ctx: dict = {"out": out, "bank": out / "bank"}
    for name, stage in STAGES:
        print(f"== demo: {name} ==", file=sys.stderr)
        code = stage(args, ctx)
        if code:
            print(f"demo stopped after stage {name!r} (exit {code})", file=sys.stderr)
            return code
        if name == args.until:
            break
    print(f"\ndemo done: bank at {ctx['bank']}")
    return 0
