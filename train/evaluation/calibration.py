"""Reference-calibrated thresholds: each class's threshold from its reference's own label.

A network's probabilities are not calibrated: the pretrained in-context network gives
many query voxels that merely resemble the reference crop a probability above 0.5, so a
fixed ``>= 0.5`` over-predicts some classes many times over (a kidney matches the other
kidney, the spleen and the liver's edge). How far above 0.5 the true structure stands
differs per class, but it can be measured without the query: segment the *reference
scan itself* with the same task list and the same passes (zoom, refinement, sliding
windows) as a query, and pick the class's threshold from a fixed ladder (``LADDER``,
never under 0.5) by what it gives against the reference's own label:

* ``volume`` (the default): the step whose predicted volume is closest to the true one
  (in log ratio, so 2x too many and 2x too few weigh the same);
* ``dice``: the step with the best Dice.

With several references a class sums its volumes (``volume``) or averages its Dice
(``dice``) over them. Ties go to the lowest step, so a class the reference pass already
gets right keeps 0.5.

On its own scan the network sees the exact crop it was given as the task and can be
over-confident there. Masking the crop's region out of the calibration would leave
nothing to calibrate for most classes (the zoom frames every structure inside its crop),
so by default the pass runs on an ``augmented`` copy of the reference instead: a gamma
of ``GAMMA`` on the intensity range and seeded Gaussian noise of ``NOISE`` standard
deviations, so no window matches the task crop voxel for voxel while the anatomy and its
label stay where they are. ``plain`` calibrates on the reference as it is.

The query's label is never read. Thresholds are cached per (runner, task list), so a
dataset's references are segmented once per runner whatever the number of queries; the
cost is one extra pass per reference scan. Every runner (the networks, the untrained
floor, the registration baseline) is calibrated by the same rule. ``maskbank segment``
calibrates its references the same way (``calibrate_images``), once per run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cached_property

import numpy as np

from .structures import LabelledScan, StructureClass

FIXED, REFERENCE = "fixed", "reference"
MODES = (FIXED, REFERENCE)
VOLUME, DICE = "volume", "dice"
CRITERIA = (VOLUME, DICE)
PLAIN, AUGMENTED = "plain", "augmented"
COPIES = (PLAIN, AUGMENTED)
LADDER = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the thresholds a class may take
GAMMA = 1.3  # intensity gamma of the augmented copy (on its min..max range)
NOISE = 0.05  # Gaussian noise of the copy, in standard deviations of the image
SEED = 0


def threshold_option_problem(mode: str, criterion: str, copy: str) -> str | None:
    """What is wrong with these threshold options, as a CLI user would fix it (None:
    nothing); the evaluation raises its own error with this text."""
    if mode not in MODES:
        return f"--threshold must be one of {', '.join(MODES)}, got {mode!r}"
    if criterion not in CRITERIA:
        return f"--threshold-by must be one of {', '.join(CRITERIA)}, got {criterion!r}"
    if copy not in COPIES:
        return f"--calibration-copy must be one of {', '.join(COPIES)}, got {copy!r}"
    return None


def describe(mode: str, criterion: str, copy: str) -> str:
    """The rule as ``results.json`` records it (what ``compare`` checks)."""
    if mode == FIXED:
        return ">= 0.5"
    ladder = ", ".join(f"{t:g}" for t in LADDER)
    return f"reference: {criterion} on the {copy} reference, from {ladder}"


def curve(prob: np.ndarray, truth: np.ndarray, ladder: Sequence[float] = LADDER) -> np.ndarray:
    """(predicted voxels, overlap voxels) at every step of ``ladder``: (len(ladder), 2)."""
    inside = prob[truth]
    return np.array(
        [[int((prob >= t).sum()), int((inside >= t).sum())] for t in ladder], dtype=np.int64
    )


def pick(
    curves: Sequence[np.ndarray],
    truths: Sequence[int],
    criterion: str = VOLUME,
    ladder: Sequence[float] = LADDER,
) -> float:
    """The step of ``ladder`` the criterion prefers over references' ``curves`` (one per
    reference, from ``curve``) with ``truths`` true voxels each; ties go to the lowest."""
    true = sum(truths)
    if not curves or true == 0:
        return float(ladder[0])
    if criterion == VOLUME:
        predicted = np.sum([c[:, 0] for c in curves], axis=0)
        score = [-abs(math.log(max(int(p), 1) / true)) for p in predicted]
    elif criterion == DICE:
        score = np.mean(
            [2 * c[:, 1] / np.maximum(c[:, 0] + n, 1) for c, n in zip(curves, truths, strict=True)],
            axis=0,
        ).tolist()
    else:
        raise ValueError(f"threshold criterion must be one of {CRITERIA}, got {criterion!r}")
    best = max(score)
    return float(ladder[next(i for i, s in enumerate(score) if s >= best - 1e-12)])


def augment(image: np.ndarray, seed: int = SEED) -> np.ndarray:
    """The calibration copy of an image: gamma ``GAMMA`` on its min..max range, plus seeded
    Gaussian noise of ``NOISE`` of its standard deviation (float32, same grid)."""
    lo, hi = float(image.min()), float(image.max())
    span = max(hi - lo, 1e-6)
    noise = np.random.default_rng(seed).standard_normal(image.shape, dtype=np.float32)
    warped = ((image - lo) / span) ** GAMMA * span + lo
    return (warped + noise * (NOISE * float(image.std()))).astype(np.float32)


def calibrate_images(
    probabilities: Callable[[np.ndarray], Iterable[tuple[list[int], np.ndarray]]],
    references: Sequence[tuple[np.ndarray, np.ndarray]],
    values: Sequence[int],
    criterion: str = VOLUME,
    copy: str = AUGMENTED,
) -> list[float]:
    """Per label value, its threshold from (image, label map) ``references`` segmented by
    ``probabilities(image) -> (task indices, maps)`` (``maskbank segment``'s passes): a
    value is calibrated on the references whose label holds it."""

    def scored() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for image, label in references:
            seen = augment(image) if copy == AUGMENTED else image
            for ids, probs in probabilities(seen):
                for i, prob in zip(ids, probs, strict=True):
                    truth = label == values[i]
                    if truth.any():
                        yield i, prob, truth

    return picked(scored(), len(values), criterion)


def picked(
    scored: Iterable[tuple[int, np.ndarray, np.ndarray]], n_tasks: int, criterion: str
) -> list[float]:
    """Each task's threshold (``pick``) from (task index, probability map, reference mask)
    triples: the one loop behind both ``calibrate_images`` and ``ReferenceCalibration``."""
    curves: list[list[np.ndarray]] = [[] for _ in range(n_tasks)]
    truths: list[list[int]] = [[] for _ in range(n_tasks)]
    for j, prob, truth in scored:
        curves[j].append(curve(prob, truth))
        truths[j].append(int(truth.sum()))
    return [pick(c, n, criterion) for c, n in zip(curves, truths, strict=True)]


class AugmentedCopy:
    """A reference scan with its intensities gamma-warped and noised (module docstring);
    the same grid, label and spacing, so it stands in for the scan in a segment call."""

    def __init__(self, scan: LabelledScan, seed: int = SEED) -> None:
        self.source = scan
        self.scan_id = f"{scan.scan_id}~augmented"
        self.dataset = scan.dataset
        self.spacing = scan.spacing
        self.seed = seed

    @cached_property
    def image(self) -> np.ndarray:
        return augment(self.source.image, self.seed)

    @property
    def label(self) -> np.ndarray:
        return self.source.label

    def mask(self, value: int) -> np.ndarray:
        return self.source.mask(value)


Tasks = list[tuple[StructureClass, list[LabelledScan]]]


class ReferenceCalibration:
    """Per (runner, task list): each task's threshold, and the seconds it took."""

    def __init__(self, criterion: str = VOLUME, copy: str = AUGMENTED) -> None:
        if problem := threshold_option_problem(REFERENCE, criterion, copy):
            raise ValueError(problem)
        self.criterion = criterion
        self.copy = copy
        self._cache: dict[tuple, list[float]] = {}
        self.chosen: list[dict] = []  # per (runner, task list, class): what was picked

    def thresholds(self, runner, tasks: Tasks) -> tuple[list[float], float]:
        """(threshold per task, seconds spent now: 0 when cached) for ``runner`` on ``tasks``.

        Each reference scan of the list is segmented once (as the copy), with the whole
        task list, the way a query is; a task is scored on the references it was given.
        """
        key = (runner.label, tuple((c.ident, tuple(r.scan_id for r in rs)) for c, rs in tasks))
        if key in self._cache:
            return self._cache[key], 0.0
        t0 = time.perf_counter()
        scans = {r.scan_id: r for _, refs in tasks for r in refs}

        def scored() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
            for scan_id, scan in sorted(scans.items()):
                seen = AugmentedCopy(scan) if self.copy == AUGMENTED else scan
                for group, probs in runner.segment(seen, tasks):
                    for j, prob in zip(group, probs, strict=True):
                        cls, refs = tasks[j]
                        if any(r.scan_id == scan_id for r in refs):
                            yield j, prob, seen.mask(cls.value)

        chosen = picked(scored(), len(tasks), self.criterion)
        self._cache[key] = chosen
        self.chosen += [
            {
                "network": runner.label,
                "class": cls.key,
                "references": [r.scan_id for r in refs],
                "threshold": t,
            }
            for (cls, refs), t in zip(tasks, chosen, strict=True)
        ]
        return chosen, time.perf_counter() - t0
