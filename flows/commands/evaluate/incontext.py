"""`maskbank evaluate incontext`: in-context few-shot segmentation, beside the untrained floor."""

from __future__ import annotations

import argparse

from flows.commands.evaluate._common import (
    add_common,
    device_of,
    fail,
    finish,
    load_networks,
    open_bank,
)

PROG = "maskbank evaluate incontext"

DESCRIPTION = """\
In-context few-shot segmentation of the labelled structures of BANK (the published
protocol): for each structure class (a label value present in >= 2 scans of a dataset)
and each query scan holding it, k reference scans of the same dataset other than the
query give the task (a crop of the preset's training crop size centred on the class's
median foreground voxel, with its mask; several references are averaged); the whole
query is segmented by sliding windows (overlap 0.5, Gaussian weighting, sigmoid,
threshold 0.5) and scored by Dice, HD95 (mm) and normalised surface Dice at 2 mm at the
bank's spacing. The untrained network of the same preset (the floor) runs beside the
checkpoint unless --no-baseline. Classes that cannot be scored in a query are listed
with the reason.
"""

EPILOG = """\
examples:
  maskbank evaluate incontext --checkpoint runs/tiny --bank eval-bank --out eval/incontext
  maskbank evaluate incontext --checkpoint runs/base/checkpoints/last.pt --bank eval-bank \\
      --shots 1,3,5 --references random --repeats 3 --out eval/base
  maskbank evaluate incontext --checkpoint random --preset base --bank eval-bank --json
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "incontext",
        help="in-context few-shot segmentation of labelled structures",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p, baseline="random")
    p.add_argument("--shots", default="1", help="comma list of reference counts (default 1)")
    p.add_argument(
        "--references",
        default="fixed",
        metavar="fixed|random|FILE",
        help="fixed: the first k scans in sorted id order; random: seeded draws (--repeats); "
        "or a JSON file {dataset: [scan ids]} / {dataset: {class: [scan ids]}}",
    )
    p.add_argument("--repeats", type=int, default=3, help="draws with random references")
    p.add_argument("--window-batch", type=int, default=2, help="windows per forward pass")
    return p


def parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        shots = ()
    if not shots or min(shots) < 1:
        raise ValueError(f"--shots must be a comma list of positive integers, got {text!r}")
    return shots


def summary_rows(results: dict) -> list[dict]:
    """One row per network and shot count: the means over structures."""
    return [
        {
            "network": s["network"],
            "shots": s["shots"],
            "Dice": s["mean_dice"],
            "HD95 mm": s["mean_hd95"],
            "NSD@2mm": s["mean_nsd"],
            "structures": s["structures"],
            "s/query": s["seconds_per_query"],
        }
        for s in results["summary"]
    ]


SUMMARY_COLUMNS = ["network", "shots", "Dice", "HD95 mm", "NSD@2mm", "structures", "s/query"]


def format_results(results: dict) -> str:
    """Terminal tables: per network and k the means, then per class."""
    from train.evaluation.report import text_table

    parts = [text_table(summary_rows(results), SUMMARY_COLUMNS)]
    nets = list(dict.fromkeys(s["network"] for s in results["summary"]))
    k0 = min(results["options"]["shots"])
    per_class: dict[tuple[str, str], dict] = {}
    for s in results["summary"]:
        if s["shots"] != k0:
            continue
        for c in s["classes"]:
            per_class.setdefault(
                (c["dataset"], c["class"]), {"class": f"{c['dataset']}/{c['class']}"}
            )
            per_class[(c["dataset"], c["class"])][s["network"]] = c["dice"]
    parts.append(f"\n{k0}-shot Dice per class:")
    parts.append(text_table(list(per_class.values()), ["class", *nets]))
    if results["not_scored"]:
        parts.append(f"\nnot scored: {len(results['not_scored'])} (reasons in results.json)")
    return "\n".join(parts)


def results_markdown(results: dict) -> str:
    from train.evaluation.report import markdown_table, provenance_markdown

    md = ["# In-context few-shot segmentation", ""]
    md.append(markdown_table(summary_rows(results), SUMMARY_COLUMNS))
    for s in results["summary"]:
        md += ["", f"## {s['network']}, {s['shots']} shot(s): per class", ""]
        md.append(
            markdown_table(s["classes"], ["dataset", "class", "queries", "dice", "hd95", "nsd"])
        )
    if results["not_scored"]:
        md += ["", "## Not scored", ""]
        md.append(markdown_table(results["not_scored"], ["dataset", "class", "query", "reason"]))
    if results["figures"]:
        md += ["", "## Figures", ""]
        md += [f"![{f}](figures/{f.rsplit('/', 1)[-1]})" for f in results["figures"]]
    md += ["", "## Provenance", "", provenance_markdown(results["run"])]
    return "\n".join(md)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from train.evaluation.checkpoint import RANDOM
    from train.evaluation.errors import EvaluationError
    from train.evaluation.incontext import InContextOptions, evaluate_incontext

    opened = open_bank(PROG, args)
    if opened is None:
        return 2
    bank, ids = opened
    try:
        options = InContextOptions(
            shots=parse_shots(args.shots),
            references=args.references,
            repeats=args.repeats,
            seed=args.seed,
            window_batch=args.window_batch,
            device=str(device_of(args.device)),
        )
        nets = load_networks(args, RANDOM)
        figures = Path(args.out) / "figures" if args.out else None
        results = evaluate_incontext(
            bank, nets, options, ids, progress=not args.no_progress, figures_dir=figures
        )
    except (EvaluationError, ValueError) as exc:
        return fail(PROG, exc)
    finish(args, bank, nets, results, results_markdown, format_results(results))
    return 0
