"""Scoring the in-context jobs: every runner on every (query, class, k, repeat).

A present class is scored by Dice, HD95, ASD and NSD (``metrics.py``); an absent one by
its false positives (voxels, millilitres, and the largest predicted 26-connected
component, a false positive from ``fp_min_voxels`` voxels on). Each query's row records
its inference seconds, passes and windows. The first present case per (runner, class),
for up to ``max_figures`` classes, is kept as the 2-D panels of its overlay figure (a
slice each, so figures are drawn later without holding any volume).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from .calibration import REFERENCE, ReferenceCalibration
from .metrics import THRESHOLD, binarise, is_miss, score
from .references import QueryJob
from .segmenters import Segmenter
from .sliding import window_count
from .structures import LabelledScan, StructureClass, centred_crop, median_foreground

if TYPE_CHECKING:
    from .incontext import InContextOptions

OnPrediction = Callable[[str, QueryJob, StructureClass, np.ndarray], None]
DEFAULT_FIGURE_CROP = 64  # reference panels when no runner has a crop (baselines only)


@dataclass
class Overlay:
    """One figure's panels: the reference crop's centre slice, and the query slice with
    the most ground truth, with the prediction and the ground truth on it."""

    network: str
    key: str  # the class's "dataset/name"
    reference: str
    query: str
    z: int
    reference_image: np.ndarray
    reference_mask: np.ndarray
    query_image: np.ndarray
    prediction: np.ndarray
    truth: np.ndarray


@dataclass
class Scored:
    """Per (runner, query, class) rows, per (runner, query) timings, figure panels."""

    structures: list[dict[str, Any]] = field(default_factory=list)
    queries: list[dict[str, Any]] = field(default_factory=list)
    overlays: dict[tuple[str, str], Overlay] = field(default_factory=dict)
    thresholds: list[dict[str, Any]] = field(default_factory=list)  # reference-calibrated


def score_jobs(
    runners: Sequence[Segmenter],
    jobs: Sequence[QueryJob],
    by_id: dict[str, LabelledScan],
    options: InContextOptions,
    progress: bool = False,
    on_prediction: OnPrediction | None = None,
) -> Scored:
    """Run every runner on every job; ``on_prediction`` sees every probability map."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs) * len(runners), desc="evaluate incontext", unit="query")
    out = Scored()
    crop = next((r.crop for r in runners if r.crop), DEFAULT_FIGURE_CROP)
    calibration = (
        ReferenceCalibration(options.threshold_by, options.calibration_copy)
        if options.threshold == REFERENCE
        else None
    )
    for runner in runners:
        for job in jobs:
            t0 = time.perf_counter()
            refs = [(c, [by_id[r] for r in ids]) for c, ids in job.tasks]
            # Before the query's passes: a runner counts the windows of its last segment call.
            thresholds, calibrating = (
                calibration.thresholds(runner, refs)
                if calibration is not None
                else ([THRESHOLD] * len(refs), 0.0)
            )
            passes = 0
            for group, probs in runner.segment(job.query, refs):
                passes += 1
                for j, prob in zip(group, probs, strict=True):
                    if on_prediction is not None:
                        on_prediction(runner.label, job, job.tasks[j][0], prob)
                    pred = binarise(prob, thresholds[j])
                    _score_task(runner.label, job, j, pred, by_id, options, out, crop)
            row = _query_row(runner, job, passes, time.perf_counter() - t0, options)
            out.queries.append({**row, "calibration_seconds": calibrating})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if calibration is not None:
        out.thresholds = calibration.chosen
    return out


def _score_task(
    label: str,
    job: QueryJob,
    j: int,
    pred: np.ndarray,
    by_id: dict[str, LabelledScan],
    options: InContextOptions,
    out: Scored,
    crop: int,
) -> None:
    """Score task ``j`` of ``job``; keep its figure panels while figures are wanted."""
    cls, ids = job.tasks[j]
    query = job.query
    gt = query.mask(cls.value)
    voxel_ml = float(np.prod(query.spacing)) / 1000.0
    row = score_row(pred, gt, query, options, voxel_ml)
    out.structures.append(
        {
            "network": label,
            "dataset": cls.dataset,
            "class": cls.name,
            "value": cls.value,
            "query": query.scan_id,
            "shots": job.shots,
            "repeat": job.repeat,
            "references": list(ids),
            **row,
        }
    )
    case = (label, cls.key)
    drawn = {c for _, c in out.overlays}
    if (
        row["present"]
        and case not in out.overlays
        and (cls.key in drawn or len(drawn) < options.max_figures)
    ):
        out.overlays[case] = overlay(label, cls, by_id[ids[0]], query, pred, gt, crop)


def _query_row(
    runner: Segmenter, job: QueryJob, passes: int, seconds: float, options: InContextOptions
) -> dict[str, Any]:
    query = job.query
    return {
        "network": runner.label,
        "query": query.scan_id,
        "shots": job.shots,
        "repeat": job.repeat,
        "classes": len(job.tasks),
        "shape": list(query.image.shape),
        # inference and scoring of the whole query, all its dataset's classes (and the
        # calibration of its task list's thresholds when this query was the first to ask)
        "seconds": seconds,
        "passes": passes,
        "windows": (
            getattr(runner, "windows", None)  # a network counts its own (zoomed passes)
            or window_count(query.image.shape, runner.crop, options.overlap) * passes
            if runner.crop
            else None
        ),
    }


def fp_component(pred: np.ndarray) -> int:
    """Voxels of the largest connected (26-neighbour) component of ``pred``."""
    if not pred.any():
        return 0
    labels, n = ndimage.label(pred, structure=np.ones((3, 3, 3), bool))
    return int(np.bincount(labels.ravel())[1:].max()) if n else 0


def score_row(
    pred: np.ndarray,
    gt: np.ndarray,
    query: LabelledScan,
    options: InContextOptions,
    voxel_ml: float,
) -> dict[str, Any]:
    """Present: the four metrics and whether it is a miss. Absent: the false positives."""
    pred_voxels, gt_voxels = int(pred.sum()), int(gt.sum())
    row: dict[str, Any] = {"present": gt_voxels > 0, "pred_voxels": pred_voxels}
    row["gt_voxels"] = gt_voxels
    if gt_voxels:
        sc = score(pred, gt, query.spacing, options.tolerance_mm)
        row.update(sc.to_dict())
        row["miss"] = is_miss(pred, gt)
        return row
    # Absent: no overlap score (it would be 1 or 0 by convention); its false positives.
    component = fp_component(pred)
    row.update(
        dice=None,
        hd95=None,
        asd=None,
        nsd=None,
        miss=False,
        fp_voxels=pred_voxels,
        fp_ml=pred_voxels * voxel_ml,
        fp_largest_component=component,
        false_positive=component >= options.fp_min_voxels,
    )
    return row


def overlay(
    label: str,
    cls: StructureClass,
    ref: LabelledScan,
    query: LabelledScan,
    pred: np.ndarray,
    gt: np.ndarray,
    crop: int,
) -> Overlay:
    """The panels of one figure (copies of 2-D slices: no volume stays referenced)."""
    z = int(np.argmax(gt.sum(axis=(0, 1))))
    rmask = ref.mask(cls.value)
    centre = median_foreground(rmask)
    rimg = centred_crop(ref.image, centre, crop, float(ref.image.min()))[:, :, crop // 2]
    rm = centred_crop(rmask, centre, crop, False)[:, :, crop // 2]
    return Overlay(
        label,
        cls.key,
        ref.scan_id,
        query.scan_id,
        z,
        np.array(rimg),
        np.array(rm),
        np.array(query.image[:, :, z]),
        np.array(pred[:, :, z]),
        np.array(gt[:, :, z]),
    )
