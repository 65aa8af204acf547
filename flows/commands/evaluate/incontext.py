"""`maskbank evaluate incontext`: in-context few-shot segmentation, beside the untrained floor."""

from __future__ import annotations

import argparse
import sys

from maskbank.flows.commands.evaluate._common import (
    add_common,
    command_line,
    device_of,
    fail,
    finish,
    open_bank,
)

PROG = "maskbank evaluate incontext"

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
sigmoid). Each class's threshold is calibrated on its references, never on the query
(--threshold). A class too large for the crop is evaluated on a coarser
grid that frames it (--reference-zoom), its probabilities interpolated back. Present classes are scored by Dice, HD95, ASD (mm) and
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
        "--reference-zoom",
        choices=("off", "fit"),
        default=None,
        help="scale-normalised inference. fit: a class is evaluated on a grid coarse enough "
        "that its reference crop shows it whole with context (its longest extent at most "
        "half the crop), but fine enough to keep its thinnest extent >= 8 voxels; reference "
        "and query are averaged down, the probabilities interpolated back. off: every class "
        "on the full grid (default: fit)",
    )
    p.add_argument(
        "--max-zoom",
        type=float,
        default=None,
        metavar="S",
        help="coarsest scale --reference-zoom fit may choose, of 1, 1.5, 2, 3, 4 (default 4)",
    )
    p.add_argument(
        "--no-zoom-refine",
        action="store_true",
        help="keep a zoomed class's coarse prediction; by default it is segmented again one "
        "step finer, inside its coarse prediction dilated by two coarse voxels",
    )
    p.add_argument(
        "--threshold",
        choices=("reference", "fixed"),
        default="reference",
        help="reference: each class's threshold is the step of 0.5, 0.6, 0.7, 0.8, 0.9, 0.95 "
        "that best fits the reference's own label when the reference scan is segmented like "
        "a query (one extra pass per reference scan and runner, cached); fixed: >= 0.5 "
        "(default: reference)",
    )
    p.add_argument(
        "--threshold-by",
        choices=("volume", "dice"),
        default="volume",
        help="what --threshold reference fits: the predicted volume closest to the true one, "
        "or the best Dice (default: volume)",
    )
    p.add_argument(
        "--calibration-copy",
        choices=("augmented", "plain"),
        default="augmented",
        help="what --threshold reference segments: a copy of the reference with its "
        "intensities gamma-warped and noised, so no window matches the task crop voxel for "
        "voxel, or the reference as it is (default: augmented)",
    )
    p.add_argument(
        "--label-names",
        default=None,
        metavar="FILE",
        help="names of the label values for this evaluation (JSON, ITK-SNAP, FreeSurfer LUT "
        "or Slicer colour table); settles names that disagree between scans",
    )
    return p


def parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        shots = ()
    if not shots or min(shots) < 1:
        raise ValueError(f"--shots must be a comma list of positive integers, got {text!r}")
    return shots


def _label_names(path: str | None) -> dict[int, str] | None:
    if not path:
        return None
    from maskbank.pipeline.errors import ScanError
    from maskbank.pipeline.label_names import read_label_names
    from maskbank.train.evaluation.errors import EvaluationError

    try:
        return read_label_names(path)
    except (ScanError, OSError, ValueError) as exc:
        raise EvaluationError(f"--label-names: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from maskbank.train.evaluation import incontext
    from maskbank.train.evaluation.errors import EvaluationError

    opened = open_bank(PROG, args)
    if opened is None:
        return 2
    bank, ids = opened
    try:
        zoom = {
            k: v
            for k, v in (("reference_zoom", args.reference_zoom), ("max_zoom", args.max_zoom))
            if v is not None
        }
        if args.no_zoom_refine:
            zoom["zoom_refine"] = False
        options = incontext.InContextOptions(
            **zoom,
            shots=parse_shots(args.shots),
            references=args.references,
            repeats=args.repeats,
            seed=args.seed,
            window_batch=args.window_batch,
            tolerance_mm=args.tolerance_mm,
            fp_min_voxels=args.fp_min_voxels,
            bootstrap=args.bootstrap,
            threshold=args.threshold,
            threshold_by=args.threshold_by,
            calibration_copy=args.calibration_copy,
            label_names=_label_names(args.label_names),
            device=str(device_of(args.device)),
        )
        runners = incontext.load_runners(
            args.checkpoint, args.preset, args.seed, floor=not args.no_baseline
        )
        result = incontext.run(
            bank,
            runners,
            options,
            scan_ids=ids,
            progress=not args.no_progress,
            command=command_line(args),
        )
    except (EvaluationError, ValueError) as exc:
        return fail(PROG, exc)
    line = result.overlap_warning()
    if line:
        print(f"{PROG}: {line}", file=sys.stderr)
    finish(args, result)
    return 0
