"""In-context few-shot segmentation of labelled structures (the published protocol).

The split, per dataset: every structure class (a label value labelled in >= 2 scans of
the dataset) gets one reference set, the first k holders in sorted id order
(``fixed``), the scans a JSON file names (``FILE``), or a seeded draw per repeat
(``random``). With several shot counts the references of k shots are the first k of
the largest k's, so every k is scored on the same queries. The queries are the
dataset's labelled scans that are no class's reference (nor of a reference's
subject, when scans carry ``subject`` metadata): a reference is never scored.

Every query is segmented for every class of its dataset's list, whatever its own
label map holds, in the same fixed order and groups (the K the network was trained
with), with the same task embeddings: a class's prediction never depends on the
query's labels. A class absent from the query is scored by its false positives
(``fp_voxels``, ``fp_ml``, and per class the share of such queries where a connected
component of >= ``fp_min_voxels`` voxels is predicted).

A task is the reference crop of the network's training crop size centred on the
class (``structures.median_foreground``) with the class's mask; several references
are averaged. As in pretraining, an all-ones "global" task rides along with each
group, averaged over the references of all classes of the dataset (so it too is the
same for every query). The query is the whole scan, segmented by sliding windows
(``sliding.py``). Each class's threshold is calibrated on its references
(``calibration.py``: the reference scan segmented as a query, the step of a ladder from 0.5
whose volume best matches the reference's own label; ``threshold="fixed"``: ``>= 0.5``);
Dice, HD95, ASD and NSD at the bank's spacing (``metrics.py``).

Means follow the published aggregation (``aggregate.py``): per class over its
queries, per dataset over classes, the headline over datasets, with bootstrap
intervals and paired tests against the first network. Per shot count they cover
only the classes scorable at every requested k (those dropped are listed).

Anything with ``label``, ``crop`` and ``segment(query, tasks)`` runs in the same loop
(``Segmenter``): the networks, and the registration baseline.

The steps: ``plan`` (classes, splits, jobs; ``references.py``), ``score`` (every runner
on every job; ``incontext_scoring.py``), ``summarise`` (the means; ``incontext_summary.py``)
into an ``InContextResult`` (tables and figures; ``incontext_report.py``). ``run`` does all
of them::

    result = run(bank, [load_network("runs/tiny"), load_network("random", "tiny")])
    print(result.text()); result.write("eval/incontext")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import aggregate
from .calibration import AUGMENTED, REFERENCE, VOLUME, threshold_option_problem
from .checkpoint import RANDOM, SCRATCH, LoadedNetwork, load_network
from .errors import EvaluationError
from .incontext_report import InContextResult
from .incontext_scoring import OnPrediction, Scored, score_jobs
from .incontext_summary import summarise as summary_of
from .references import (
    FIXED,
    RANDOM_REFS,
    JobPlan,
    QueryJob,
    ReferencePlan,
    common_classes,
    plan_jobs,
)
from .result import record
from .segmenters import (
    InContextEvaluator,
    Segmenter,
    pretraining_overlap,
    refuse_untrained_incontext,
)
from .structures import LabelledScan, StructureClass, find_classes, labelled_scans, require_classes
from .zoom import FIT as ZOOM_FIT
from .zoom import OFF as ZOOM_OFF
from .zoom import zoom_option_problem

__all__ = [
    "FIXED",
    "RANDOM_REFS",
    "REGISTRATION",
    "InContextOptions",
    "InContextPlan",
    "InContextResult",
    "QueryJob",
    "ReferencePlan",
    "Segmenter",
    "load_runners",
    "plan",
    "pretraining_overlap",
    "query_scan_ids",
    "run",
    "score",
    "summarise",
]

FP_MIN_VOXELS = 10
REGISTRATION = "registration"  # the atlas-registration baseline, by name


@dataclass(frozen=True)
class InContextOptions:
    shots: tuple[int, ...] = (1,)
    references: str = FIXED  # fixed | random | path of a JSON file naming reference scans
    repeats: int = 3  # reference draws with random references
    seed: int = 0
    overlap: float = 0.5
    window_batch: int = 2
    tolerance_mm: float = 2.0
    max_output_bytes: int = 1 << 30
    device: str = "cpu"
    max_figures: int = 48
    fp_min_voxels: int = FP_MIN_VOXELS  # a false-positive component of an absent class
    bootstrap: int = aggregate.BOOTSTRAP
    label_names: dict[int, str] | None = None  # value -> name, settles conflicting names
    # Scale-normalised inference (zoom.py): fit | off, and the coarsest scale allowed.
    reference_zoom: str = ZOOM_FIT
    max_zoom: float = 4.0
    zoom_refine: bool = True  # zoomed classes again one step finer, inside their coarse gate
    # Thresholds (calibration.py): fixed 0.5, or per class from the reference's own label.
    threshold: str = REFERENCE
    threshold_by: str = VOLUME  # volume | dice
    calibration_copy: str = AUGMENTED  # augmented | plain
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shots or any(int(k) < 1 for k in self.shots):
            raise EvaluationError(f"--shots must be positive integers, got {self.shots}")
        if self.references not in (FIXED, RANDOM_REFS) and not Path(self.references).is_file():
            raise EvaluationError(
                f"--references must be 'fixed', 'random' or a JSON file, got {self.references!r}"
            )
        if not self.tolerance_mm >= 0:
            raise EvaluationError(f"--tolerance-mm must be >= 0, got {self.tolerance_mm}")
        if self.fp_min_voxels < 1:
            raise EvaluationError(f"--fp-min-voxels must be >= 1, got {self.fp_min_voxels}")
        if self.repeats < 1:
            raise EvaluationError(f"--repeats must be >= 1, got {self.repeats}")
        if problem := zoom_option_problem(self.reference_zoom, self.max_zoom):
            raise EvaluationError(problem)
        if problem := threshold_option_problem(
            self.threshold, self.threshold_by, self.calibration_copy
        ):
            raise EvaluationError(problem)

    @property
    def max_shots(self) -> int:
        return max(int(k) for k in self.shots)


@dataclass
class InContextPlan:
    """What will run: the runners, the labelled scans and classes, the jobs."""

    networks: list[LoadedNetwork | Segmenter]  # as given
    runners: list[Segmenter]  # the networks as segmenters, in the same order
    scans: list[LabelledScan]
    classes: list[StructureClass]
    jobs: JobPlan
    common: set[tuple[str, int]]  # (dataset, value) scorable at every k
    dropped: dict[int, list[str]]  # per k, the classes left out of its means

    @property
    def by_id(self) -> dict[str, LabelledScan]:
        return {s.scan_id: s for s in self.scans}


def plan(
    bank,
    networks: Sequence[LoadedNetwork | Segmenter],
    options: InContextOptions,
    scan_ids: list[str] | None = None,
) -> InContextPlan:
    """Check the networks, find the classes, split references and queries, list the jobs."""
    if not networks:
        raise EvaluationError("nothing to evaluate: give a checkpoint or a baseline")
    for net in networks:
        if isinstance(net, LoadedNetwork):
            refuse_untrained_incontext(net)
    labels = [n.label for n in networks]
    if len(set(labels)) != len(labels):
        raise EvaluationError(f"two networks carry one name: {labels}; give distinct runs")
    scans = labelled_scans(bank, scan_ids)
    classes, skipped = find_classes(scans, label_names=options.label_names)
    require_classes(classes, skipped, bank)
    jobs = plan_jobs(classes, skipped, scans, options)
    common, dropped = common_classes(jobs, classes, options.shots)
    runners: list[Segmenter] = [
        InContextEvaluator(n, options) if isinstance(n, LoadedNetwork) else n for n in networks
    ]
    return InContextPlan(list(networks), runners, scans, classes, jobs, common, dropped)


def score(
    planned: InContextPlan,
    options: InContextOptions,
    progress: bool = False,
    on_prediction: OnPrediction | None = None,
) -> Scored:
    """Every runner on every job: per (query, class) rows, per query timings, figure panels.

    ``on_prediction(label, job, class, probabilities)`` sees every probability map (tests
    compare them bit for bit; a caller may save them).
    """
    return score_jobs(
        planned.runners, planned.jobs.jobs, planned.by_id, options, progress, on_prediction
    )


def summarise(planned: InContextPlan, scored: Scored, options: InContextOptions) -> InContextResult:
    """The means, intervals and paired tests, the split, the fairness checks: the result."""
    by_id = planned.by_id
    runners = planned.runners
    results = summary_of(
        [r.label for r in runners],
        options,
        scored.structures,
        scored.queries,
        planned.jobs.not_scored,
        [],
        planned.common,
        planned.dropped,
        window=next((r.crop for r in runners if r.crop), None),
    )
    results["classes"] = [
        {"dataset": c.dataset, "value": c.value, "class": c.name, "holders": list(c.scans)}
        for c in planned.classes
    ]
    names = {c.ident: c.name for c in planned.classes}
    results["references"] = [
        sp.to_dict({v: names[(sp.dataset, v)] for v in sp.references}) for sp in planned.jobs.splits
    ]
    queried = sorted({q for sp in planned.jobs.splits for q in sp.queries})
    overlap, detail = pretraining_overlap(planned.networks, [by_id[q] for q in queried])
    results["pretraining_overlap"] = overlap
    results["pretraining_overlap_by_network"] = detail
    results["thresholds"] = scored.thresholds
    results["baselines"] = {
        r.label: r.stats()
        for r in runners
        if not isinstance(r, InContextEvaluator) and hasattr(r, "stats")
    }
    if options.reference_zoom != ZOOM_OFF:  # the scale each class was evaluated at
        results["reference_scales"] = {
            r.label: dict(sorted(r.scales.items()))
            for r in runners
            if isinstance(r, InContextEvaluator)
        }
    return InContextResult(results, scored.overlays)


def run(
    bank,
    networks: Sequence[LoadedNetwork | Segmenter],
    options: InContextOptions | None = None,
    *,
    scan_ids: list[str] | None = None,
    progress: bool = False,
    command: Sequence[str] | None = None,
    on_prediction: OnPrediction | None = None,
) -> InContextResult:
    """Score every network or baseline on every (query, class, k, repeat): the result.

    ``command`` is recorded as the provenance's command line (default ``sys.argv``).
    """
    options = options or InContextOptions()
    planned = plan(bank, networks, options, scan_ids)
    scored = score(planned, options, progress, on_prediction)
    result = summarise(planned, scored, options)
    record(result.data, command, bank, planned.networks)
    return result


def load_runners(
    checkpoints: Sequence[str], preset: str | None = None, seed: int = 0, floor: bool = True
) -> list[LoadedNetwork | Segmenter]:
    """The checkpoints and baselines in the order given, then the untrained floor.

    Each item is a checkpoint (file or run folder), ``random`` or ``registration`` (the
    atlas baseline). The floor (unless ``floor`` is False or an untrained network is
    given) has the first checkpoint's preset and crop, or ``preset``.
    """
    runners: list[LoadedNetwork | Segmenter] = []
    nets: list[LoadedNetwork] = []
    for item in checkpoints:
        if item == REGISTRATION:
            runners.append(registration_baseline())
            continue
        net = load_network(RANDOM if item == SCRATCH else item, preset, seed)
        runners.append(net)
        nets.append(net)
    trained = [n for n in nets if n.sha256 is not None]
    if floor and not any(n.sha256 is None for n in nets):
        base = load_network(RANDOM, trained[0].preset if trained else preset, seed)
        if trained:
            base.crop = trained[0].crop  # the same reference crops and windows
        runners.append(base)
    labels = [r.label for r in runners]
    if len(set(labels)) != len(labels):
        raise EvaluationError(f"--checkpoint names one network twice: {labels}")
    return runners


def registration_baseline() -> Segmenter:
    """The atlas-registration baseline, or a clear error when this install lacks it."""
    try:
        from .registration import RegistrationBaseline
    except ImportError as exc:
        raise EvaluationError(
            f"--checkpoint registration needs the registration baseline "
            f"(train/evaluation/registration.py and SimpleITK): {exc}"
        ) from exc
    return RegistrationBaseline()


def query_scan_ids(
    bank,
    options: InContextOptions | None = None,
    scan_ids: list[str] | None = None,
) -> list[str]:
    """The scans an in-context evaluation with ``options`` will score as queries.

    What a pretraining run must leave out to be evaluated on scans it never saw (the demo
    pretrains on the rest of its bank).
    """
    options = options or InContextOptions()
    scans = labelled_scans(bank, scan_ids)
    classes, _ = find_classes(scans, label_names=options.label_names)
    splits = plan_jobs(classes, [], scans, options).splits
    return sorted({q for sp in splits for q in sp.queries})
