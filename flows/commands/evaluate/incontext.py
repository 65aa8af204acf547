"""`maskbank evaluate incontext`: in-context few-shot segmentation, beside the untrained floor."""

from __future__ import annotations

import argparse
import sys

from maskbank.flows.commands.evaluate._common import (
    add_common,
    device_of,
    fail,
    finish,
    open_bank,
)

PROG = "maskbank evaluate incontext"
REGISTRATION = "registration"

DESCRIPTION = """\
In-context few-shot segmentation of the labelled structures of BANK (the published
protocol; docs/evaluation.md lists where and why this one differs).

Split per dataset: every structure class (a label value labelled in >= 2 scans of a
dataset) gets one set of reference scans, used for every query: the first k holders in
sorted id order (fixed), the scans a JSON file names, or seeded draws per repeat
(random). The queries are the dataset's other labelled scans; a reference is never a
query, and with a `subject` manifest column no subject is split between the two.

Every query is segmented for every class of its dataset, whatever its own label map
holds (a class's prediction never depends on the query's labels): a reference crop of
the training crop size centred on the class (several references averaged) gives the
task; the whole query is segmented by sliding windows (overlap 0.5, Gaussian blending,
sigmoid, probability >= 0.5). Present classes are scored by Dice, HD95, ASD (mm) and
normalised surface Dice at --tolerance-mm; a miss takes a fixed 500 mm surface
distance. Absent classes are scored by their false positives.

Headline: mean over datasets of the mean over classes of the mean over queries, with
a 95 % bootstrap interval (queries resampled within class); every other network is
compared with the first by the paired difference, its interval and the Wilcoxon
signed-rank p. With several --shots, each k is summarised over the classes scorable at
every k. The untrained network of the same preset (the floor) runs beside the
checkpoints unless --no-baseline; --checkpoint registration adds the classical atlas
baseline (register each reference onto the query, warp its mask, average).
"""

EPILOG = """\
examples:
  maskbank evaluate incontext --checkpoint runs/tiny --bank eval-bank --out eval/incontext
  maskbank evaluate incontext --checkpoint runs/base --checkpoint registration \\
      --bank eval-bank --shots 1,3,5 --out eval/base
  maskbank evaluate incontext --checkpoint runs/base --bank eval-bank --references random \\
      --repeats 3 --label-names names.txt --json
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
    add_common(
        p,
        baseline="random",
        multiple=True,
        extra_help="; 'registration' for the atlas-registration baseline. Repeat to run "
        "several side by side; the first is the one the others are compared with",
    )
    p.add_argument("--shots", default="1", help="comma list of reference counts (default 1)")
    p.add_argument(
        "--references",
        default="fixed",
        metavar="fixed|random|FILE",
        help="fixed: the first k holders of each class in sorted id order; random: seeded "
        "draws per repeat (--repeats); or a JSON file {dataset: [scan ids]} / "
        "{dataset: {class: [scan ids]}} (the named scans are never queries)",
    )
    p.add_argument("--repeats", type=int, default=3, help="draws with random references")
    p.add_argument("--window-batch", type=int, default=2, help="windows per forward pass")
    p.add_argument(
        "--tolerance-mm",
        type=float,
        default=2.0,
        help="tolerance of the normalised surface Dice (default 2 mm)",
    )
    p.add_argument(
        "--fp-min-voxels",
        type=int,
        default=10,
        metavar="N",
        help="a class absent from a query counts as a false positive there when a "
        "connected component of >= N voxels is predicted (default 10)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples of the confidence intervals (default 1000)",
    )
    p.add_argument(
        "--label-names",
        default=None,
        metavar="FILE",
        help="names of the label values for this evaluation (JSON, ITK-SNAP, FreeSurfer LUT "
        "or Slicer colour table); settles names that disagree between scans",
    )
    return p


def load_runners(args: argparse.Namespace) -> list:
    """The checkpoints and baselines in the order given, then the untrained floor.

    ``registration`` is the atlas baseline (imported only when asked for). The floor has
    the first network's preset and crop (or --preset when only baselines are given).
    """
    from maskbank.train.evaluation.checkpoint import RANDOM, SCRATCH, load_network
    from maskbank.train.evaluation.errors import EvaluationError

    given = list(args.checkpoint)
    runners, nets = [], []
    for item in given:
        if item == REGISTRATION:
            runners.append(registration_baseline())
        elif item in (RANDOM, SCRATCH):
            net = load_network(RANDOM, args.preset, args.seed)
            runners.append(net)
            nets.append(net)
        else:
            net = load_network(item, args.preset, args.seed)
            runners.append(net)
            nets.append(net)
    trained = [n for n in nets if n.sha256 is not None]
    if not args.no_baseline and not any(n.sha256 is None for n in nets):
        preset = trained[0].preset if trained else args.preset
        floor = load_network(RANDOM, preset, args.seed)
        if trained:
            floor.crop = trained[0].crop  # the same reference crops and windows
        runners.append(floor)
    labels = [r.label for r in runners]
    if len(set(labels)) != len(labels):
        raise EvaluationError(f"--checkpoint names one network twice: {labels}")
    return runners


def registration_baseline():
    """The atlas-registration baseline, or a clear error when this install lacks it."""
    from maskbank.train.evaluation.errors import EvaluationError

    try:
        from maskbank.train.evaluation.registration import RegistrationBaseline
    except ImportError as exc:
        raise EvaluationError(
            f"--checkpoint registration needs the registration baseline "
            f"(train/evaluation/registration.py and SimpleITK): {exc}"
        ) from exc
    return RegistrationBaseline()


def parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        shots = ()
    if not shots or min(shots) < 1:
        raise ValueError(f"--shots must be a comma list of positive integers, got {text!r}")
    return shots


def _p(value) -> str | None:
    """A p-value: three decimals, or scientific below 0.001."""
    if value is None:
        return None
    return f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def _ci(value, ci) -> str:
    from maskbank.train.evaluation.report import fmt

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


def format_results(results: dict) -> str:
    """Terminal tables: per network and k the headline, then per class Dice at the fewest k."""
    from maskbank.train.evaluation.report import text_table

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


def results_markdown(results: dict) -> str:
    from maskbank.train.evaluation.report import markdown_table, provenance_markdown

    overlap = overlap_line(results)
    md = [
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
    for s in results["summary"]:
        md += ["", f"## {s['network']}, {s['shots']} shot(s)", "", "Per dataset:", ""]
        md.append(markdown_table(s["datasets"], ["dataset", "mean_dice", "classes"]))
        rows = [
            {
                **c,
                "Dice [95% CI]": _ci(
                    c["dice"], s.get("class_ci", {}).get(f"{c['dataset']}/{c['class']}")
                ),
                "FP rate": (
                    f"{c['fp_queries']}/{c['absent_queries']}" if c["absent_queries"] else "–"
                ),
            }
            for c in s["classes"]
        ]
        md += ["", "Per class:", "", markdown_table(rows, CLASS_COLUMNS)]
        if s.get("dropped"):
            md += ["", "Left out of these means: " + ", ".join(s["dropped"])]
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
    if paired:
        first = results["networks"][0]["name"] if results["networks"] else "the first network"
        md += ["", f"## Paired differences vs {first}", ""]
        md.append(
            "Headline statistic of (network − first) over the common (class, query) pairs, "
            "bootstrap 95 % interval, Wilcoxon signed-rank p over the pairs."
        )
        md += [
            "",
            markdown_table(paired, ["network", "shots", "metric", "diff", "ci", "p", "pairs"]),
        ]
    if results.get("baselines"):
        md += ["", "## Baselines", ""]
        for name, stats in results["baselines"].items():
            md.append(
                f"- `{name}`: {stats.get('registrations')} registrations, "
                f"{stats.get('seconds_per_registration') or 0:.2f} s each, "
                f"{stats.get('fallbacks')} fallback(s)"
            )
    md += ["", "## References and queries", ""]
    for sp in results.get("references", []):
        refs = "; ".join(f"{n}: {', '.join(c['references'])}" for n, c in sp["classes"].items())
        md.append(
            f"- {sp['dataset']} (repeat {sp['repeat']}): references {refs}; queries "
            f"{', '.join(sp['queries']) or 'none'}"
        )
    cases = [{**r, "references": ", ".join(r["references"])} for r in results["structures"]]
    md += ["", "## Per case", ""]
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
    if results["figures"]:
        md += ["", "## Figures", ""]
        md += [f"![{f}](figures/{f.rsplit('/', 1)[-1]})" for f in results["figures"]]
    md += ["", "## Provenance", "", provenance_markdown(results["run"])]
    return "\n".join(md)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from maskbank.train.evaluation.errors import EvaluationError
    from maskbank.train.evaluation.incontext import InContextOptions, evaluate_incontext

    opened = open_bank(PROG, args)
    if opened is None:
        return 2
    bank, ids = opened
    try:
        names = None
        if args.label_names:
            from maskbank.pipeline.errors import ScanError
            from maskbank.pipeline.label_names import read_label_names

            try:
                names = read_label_names(args.label_names)
            except (ScanError, OSError, ValueError) as exc:
                raise EvaluationError(f"--label-names: {exc}") from exc
        options = InContextOptions(
            shots=parse_shots(args.shots),
            references=args.references,
            repeats=args.repeats,
            seed=args.seed,
            window_batch=args.window_batch,
            tolerance_mm=args.tolerance_mm,
            fp_min_voxels=args.fp_min_voxels,
            bootstrap=args.bootstrap,
            label_names=names,
            device=str(device_of(args.device)),
        )
        runners = load_runners(args)
        figures = Path(args.out) / "figures" if args.out else None
        results = evaluate_incontext(
            bank, runners, options, ids, progress=not args.no_progress, figures_dir=figures
        )
    except (EvaluationError, ValueError) as exc:
        return fail(PROG, exc)
    line = overlap_line(results)
    if line:
        print(f"{PROG}: {line}", file=sys.stderr)
    finish(args, bank, runners, results, results_markdown, format_results(results))
    return 0
