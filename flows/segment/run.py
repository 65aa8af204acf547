"""Segment a cohort: the network and its tasks are loaded once, queries stream through.

`segment` is the Python API behind ``maskbank segment``: it yields one `SegmentResult`
per query, in input order in-process, in completion order on a Dask cluster. A query
that cannot be segmented fails alone with its reason; a query whose outputs were
already written by the same network and tasks is skipped.

Per query: prepared like the pretraining bank's scans (`query.prepare_query`),
segmented by sliding windows one task group at a time, each class at the scale its
references ask for and refined one step finer (the in-context evaluation's
``--reference-zoom``, ``--max-zoom`` and ``--no-zoom-refine``, with its defaults),
thresholded (each label at the threshold its references calibrate, as the in-context
evaluation's ``--threshold reference``, else ``p >= 0.5``; where two classes pass, the more
probable wins), mapped back onto the query's own grid and affine (`geometry.GridMap`) and
written atomically (`outputs`).

Calibration (``train.evaluation.calibration``) needs the reference images and masks: with
``--reference`` pairs each label's threshold is picked once per run, from the references
segmented as queries, and ``--save-task`` keeps the thresholds and their rule in the task
file; a run from a task file takes both from there (a file made without calibration: 0.5).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from maskbank.flows.inputs import InputError, ScanInput, collect_inputs
from maskbank.pipeline.config import default_scan_memory
from maskbank.pipeline.errors import ScanError
from maskbank.train.evaluation.calibration import (
    FIXED,
    REFERENCE,
    calibrate_images,
    describe,
    threshold_option_problem,
)
from maskbank.train.evaluation.zoom import OFF as ZOOM_OFF
from maskbank.train.evaluation.zoom import zoom_option_problem
from maskbank.train.postprocess import largest_component
from maskbank.train.segment.inference import Segmenter
from maskbank.train.segment.tasks import TaskFileError, TaskSet, load_tasks, save_tasks

from . import network as networks
from .errors import SegmentError
from .outputs import PROB_SCALE, completed, output_paths, quantise, write_json, write_nifti
from .query import prepare_query, segment_bytes_on_grid
from .references import tasks_from_references
from .result import SegmentResult

THRESHOLD = 0.5


@dataclass(frozen=True)
class SegmentOptions:
    """How every query of a run is segmented (JSON-able: it travels to Dask workers)."""

    spacing: tuple[float, float, float] | None = None  # None: as recorded (network.py)
    modality: str = "auto"
    device: str = "cpu"
    window_batch: int | None = None  # None: `auto_window_batch` of the network's crop
    overlap: float = 0.5
    save_probabilities: bool = False
    largest_component: bool = False
    max_scan_memory: int | None = None  # None: `default_scan_memory` of the worker
    threads: int | None = None  # torch threads per worker process
    # Scale-normalised inference, as the in-context evaluation's (train/evaluation/zoom.py)
    reference_zoom: str = "fit"  # fit | off
    max_zoom: float = 4.0  # the coarsest scale a class may take
    zoom_refine: bool = True  # zoomed classes again one step finer, inside their coarse gate
    # Per-label thresholds calibrated on the references, as the in-context evaluation's
    threshold: str = REFERENCE  # reference | fixed
    threshold_by: str = "volume"  # volume | dice
    calibration_copy: str = "augmented"  # augmented | plain

    def __post_init__(self) -> None:
        if problem := zoom_option_problem(self.reference_zoom, self.max_zoom):
            raise SegmentError(problem)
        if problem := threshold_option_problem(
            self.threshold, self.threshold_by, self.calibration_copy
        ):
            raise SegmentError(problem)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _largest_components(label: np.ndarray, values: list[int]) -> np.ndarray:
    """Keep each value's largest 26-connected component (``train.postprocess``)."""
    for value in values:
        mask = label == value
        if mask.any():
            label[mask & ~largest_component(mask, connectivity=3)] = 0
    return label


def segment_query(
    query: ScanInput,
    segmenter: Segmenter,
    spacing: tuple[float, float, float],
    options: SegmentOptions,
    out: str | Path,
    network_sha256: str | None,
    task_sha256: str,
    provenance: dict[str, Any] | None = None,
    thresholds: Sequence[float] | None = None,
) -> SegmentResult:
    """Segment one query and write its outputs; never raises for a bad query.

    ``thresholds``: one per label of the task set (None: ``THRESHOLD`` for every label).
    """
    t0 = time.perf_counter()
    tasks = segmenter.tasks
    cuts = [float(t) for t in thresholds] if thresholds else [THRESHOLD] * len(tasks.values)
    paths = output_paths(out, query.scan_id)
    names = dict(zip(tasks.values, tasks.names, strict=True))
    prob = options.save_probabilities
    done = completed(out, query.scan_id, network_sha256, task_sha256, prob)
    zoomed = any(s != 1 for s in tasks.class_scales)
    if done is not None and zoomed and done.get("zoom_refine") != segmenter.zoom_refine:
        done = None  # made with the other coarse-to-fine setting: redo
    if done is not None and _thresholds_record(tasks, cuts) != done.get("thresholds", {}):
        done = None  # thresholded otherwise (another calibration, or none): redo
    if done is not None:
        return SegmentResult(
            query.scan_id,
            query.image,
            "skipped",
            "already segmented with this network and task",
            time.perf_counter() - t0,
            str(paths["seg"]),
            str(paths["prob"]) if prob else None,
            str(paths["json"]),
            names,
            {int(k): v for k, v in done.get("voxels", {}).items()},
            {int(k): v for k, v in done.get("volume_ml", {}).items()},
        )
    try:
        return _segment_query(
            query, segmenter, spacing, options, paths, names, network_sha256, task_sha256,
            provenance or {}, t0, thresholds,
        )  # fmt: skip
    except ScanError as exc:
        reason = exc.reason
    except MemoryError:
        reason = (
            "out of memory while segmenting; lower --max-scan-memory so such scans are "
            "refused up front, or run fewer --workers"
        )
    except Exception as exc:  # noqa: BLE001 - one query's failure never stops the cohort
        reason = f"{type(exc).__name__}: {exc}"
    return SegmentResult(query.scan_id, query.image, "failed", reason, time.perf_counter() - t0)


def _segment_query(
    query: ScanInput,
    segmenter: Segmenter,
    spacing: tuple[float, float, float],
    options: SegmentOptions,
    paths: dict[str, Path],
    names: dict[int, str],
    network_sha256: str | None,
    task_sha256: str,
    provenance: dict[str, Any],
    t0: float,
    thresholds: Sequence[float] | None,
) -> SegmentResult:
    tasks = segmenter.tasks
    values = tasks.values
    cuts = [float(t) for t in thresholds] if thresholds else [THRESHOLD] * len(values)
    modality = query.modality or options.modality
    group = segmenter.largest_group
    series = (query.metadata or {}).get("dicom_series")
    pq = prepare_query(
        query.image,
        spacing,
        modality,
        options.max_scan_memory,
        group=group,
        n_labels=len(values),
        prob=options.save_probabilities,
        series=series,
        refine=segmenter.refines,
    )
    if modality == "auto" and tasks.modality and pq.modality != tasks.modality:
        raise ScanError(
            query.image,
            f"looks like {pq.modality.upper()} but the task was made on "
            f"{tasks.modality.upper()} references; pass --modality to segment it anyway",
        )
    t_prep = time.perf_counter() - t0
    dtype = np.uint8 if max(values) < 256 else np.uint16
    label = np.zeros(pq.image.shape, dtype=dtype)
    best = np.zeros(pq.image.shape, dtype=np.float32)
    probs_out = None
    if options.save_probabilities:
        probs_out = np.zeros((*pq.grid.original_shape, len(values)), dtype=np.uint8)
    for ids, probs in segmenter.probabilities(pq.image):
        for j, i in enumerate(ids):
            p = probs[j]
            take = (p >= cuts[i]) & (p > best)
            label[take] = values[i]
            best[take] = p[take]
            if probs_out is not None:
                probs_out[..., i] = pq.grid.to_original(quantise(p))
        del probs
    del best
    if options.largest_component:
        label = _largest_components(label, values)
    seg = pq.grid.to_original(label)
    del label
    counts = np.bincount(seg.ravel(), minlength=max(values) + 1)
    voxel_ml = float(abs(np.linalg.det(pq.affine[:3, :3]))) / 1000.0
    voxels = {v: int(counts[v]) for v in values}
    volume = {v: round(n * voxel_ml, 3) for v, n in voxels.items()}
    write_nifti(paths["seg"], seg, pq.affine)
    if probs_out is not None:
        write_nifti(paths["prob"], probs_out, pq.affine, scale=PROB_SCALE)
    seconds = time.perf_counter() - t0
    record = {
        "scan_id": query.scan_id,
        "source": query.image,
        "labels": {str(v): n for v, n in names.items()},
        "segmentation": paths["seg"].name,
        "probabilities": paths["prob"].name if probs_out is not None else None,
        "probability_channels": [str(v) for v in values] if probs_out is not None else None,
        "threshold": _rule(tasks, options, thresholds),
        "thresholds": _thresholds_record(tasks, cuts),
        "largest_component": options.largest_component,
        **zoom_record(tasks, segmenter.zoom_refine),
        "voxels": {str(v): n for v, n in voxels.items()},
        "volume_ml": {str(v): x for v, x in volume.items()},
        "modality": pq.modality,
        "spacing": list(spacing),
        "network_sha256": network_sha256,
        "task_sha256": task_sha256,
        "seconds": round(seconds, 3),
        "seconds_prepare": round(t_prep, 3),
        **provenance,
    }
    write_json(paths["json"], record)
    return SegmentResult(
        query.scan_id,
        query.image,
        "ok",
        None,
        seconds,
        str(paths["seg"]),
        str(paths["prob"]) if probs_out is not None else None,
        str(paths["json"]),
        names,
        voxels,
        volume,
    )


def _rule(tasks: TaskSet, options: SegmentOptions, thresholds: Sequence[float] | None) -> str:
    """The threshold rule as results record it: the one that calibrated a task file's
    thresholds where it says so, else the one this run's options name."""
    if thresholds and tasks.threshold_rule:
        return tasks.threshold_rule
    mode = options.threshold if thresholds else FIXED
    return describe(mode, options.threshold_by, options.calibration_copy)


def _thresholds_record(tasks: TaskSet, cuts: list[float]) -> dict[str, float]:
    """Each label value's threshold, as a query's JSON records it."""
    return {str(v): t for v, t in zip(tasks.values, cuts, strict=True)}


def zoom_record(tasks: TaskSet, refine: bool) -> dict[str, Any]:
    """The reference zoom a query was segmented with, and each label's scale."""
    zoom = tasks.zoom or {}
    return {
        "reference_zoom": zoom.get("reference_zoom", ZOOM_OFF),
        "max_zoom": zoom.get("max_zoom"),
        "zoom_refine": refine,
        "scales": {str(v): s for v, s in zip(tasks.values, tasks.class_scales, strict=True)},
    }


def _task_zoom(tasks: TaskSet, options: SegmentOptions, task_file: str) -> TaskSet:
    """A task file's classes at the scales the options ask for.

    Its scales were chosen from reference masks it does not hold: ``off`` drops them (the
    scale-1 embeddings are always there); another ``--max-zoom`` cannot be honoured.
    """
    if options.reference_zoom == ZOOM_OFF:
        return tasks.unzoomed()
    if tasks.zoom is None:
        print(
            f"warning: {task_file} was made without a reference zoom: its classes are "
            "segmented at scale 1; make it again from --reference to zoom them",
            file=sys.stderr,
        )
        return tasks
    made = (tasks.zoom.get("reference_zoom"), float(tasks.zoom.get("max_zoom", 0)))
    if made != (options.reference_zoom, float(options.max_zoom)):
        raise SegmentError(
            f"{task_file} was made with --reference-zoom {made[0]} --max-zoom {made[1]:g}, "
            f"not {options.reference_zoom} / {options.max_zoom:g}: pass those, "
            "--reference-zoom off, or make the task again from references"
        )
    return tasks


class SegmentRun:
    """A set-up run: network loaded, tasks embedded, spacing fixed, queries collected.

    Every usage problem surfaces here, as `SegmentError`, before any query is read.
    """

    def __init__(
        self,
        checkpoint: str,
        queries: Sequence[str],
        *,
        references: Sequence[tuple[str, str]] | None = None,
        task: str | None = None,
        labels: str | None = None,
        label_names: str | None = None,
        out: str | Path = "segmentations",
        save_task: str | None = None,
        options: SegmentOptions | None = None,
    ) -> None:
        self.options = options or SegmentOptions()
        self.out = Path(out)
        self.checkpoint = checkpoint
        try:
            found = collect_inputs([str(q) for q in queries])
        except (InputError, ScanError) as exc:
            raise SegmentError(str(exc)) from exc
        # an output folder inside a query folder: its files are results, not queries
        outside = [
            q for q in found if not Path(q.image).resolve().is_relative_to(self.out.resolve())
        ]
        if not outside:
            raise SegmentError(f"no queries outside the output folder {self.out}")
        self.queries = outside
        self.network = networks.load(checkpoint)
        net = self.network
        given = [references and "--reference", task and "--task"]
        if net.finetuned is not None:
            if any(given):
                raise SegmentError(
                    f"{checkpoint} is a fine-tuned network with its own classes "
                    f"{net.finetuned.names}; it takes no --reference or --task"
                )
            tasks: TaskSet | None = net.finetuned
        elif all(given):
            raise SegmentError("give --reference pairs or --task FILE, not both")
        elif task:
            try:
                tasks = load_tasks(task, net.sha256)
            except TaskFileError as exc:
                raise SegmentError(str(exc)) from exc
            tasks = _task_zoom(tasks, self.options, task)
        elif references:
            tasks = None
        else:
            raise SegmentError(
                f"{checkpoint} is a pretrained in-context network: say what to segment with "
                "--reference IMAGE MASK (one or more) or --task FILE"
            )
        given_spacing = self.options.spacing
        recorded = tasks.spacing if tasks is not None else None
        if recorded and given_spacing and not np.allclose(recorded, given_spacing, atol=1e-6):
            raise SegmentError(
                f"the task was made at {recorded} mm, not at --spacing "
                f"{tuple(given_spacing)}: its embeddings belong to that grid; drop "
                "--spacing, or make the task again from references at the new spacing"
            )
        self.spacing, self.spacing_source = networks.resolve_spacing(given_spacing, net, tasks)
        refs = None
        if tasks is None:
            tasks, refs = tasks_from_references(
                net,
                [(str(i), str(m)) for i, m in references or []],
                self.spacing,
                labels=labels,
                label_names=label_names,
                modality=self.options.modality,
                budget=self.options.max_scan_memory,
                device=self.options.device,
                reference_zoom=self.options.reference_zoom,
                max_zoom=self.options.max_zoom,
            )
        elif labels:
            tasks = _select(tasks, labels)
        self.tasks = tasks
        self.task_sha256 = tasks.digest()
        self._segmenter: Segmenter | None = None
        # None: every label at THRESHOLD (fixed, or a task file made without calibration)
        self.thresholds: list[float] | None = None
        self.calibration_seconds = 0.0
        if self.options.threshold == REFERENCE and refs is None:
            self.thresholds = tasks.thresholds  # as the task file's references calibrated them
        elif self.options.threshold == REFERENCE:
            self._check_calibration_memory(refs)
            started = time.perf_counter()
            self.thresholds = calibrate_images(
                self.segmenter.probabilities,
                [(r.image, r.label) for r in refs],
                tasks.values,
                self.options.threshold_by,
                self.options.calibration_copy,
            )
            self.calibration_seconds = time.perf_counter() - started
            rule = describe(REFERENCE, self.options.threshold_by, self.options.calibration_copy)
            # a --save-task keeps them and their rule (queries record the same rule: ``_rule``)
            self.tasks = replace(tasks, thresholds=self.thresholds, threshold_rule=rule)
        self.task_file = str(save_tasks(self.tasks, save_task)) if save_task else task

    def _check_calibration_memory(self, refs) -> None:
        """Calibration segments each reference as a query (and an augmented copy of it):
        refuse up front, as a query would be, when that needs more than the budget."""
        budget = self.options.max_scan_memory or default_scan_memory()
        group = self.segmenter.largest_group
        for ref in refs:
            need = segment_bytes_on_grid(ref.image.size, group, self.segmenter.refines)
            need += ref.image.nbytes  # the augmented copy
            if need > budget:
                raise SegmentError(
                    f"calibrating the thresholds on reference {ref.ref_id} needs about "
                    f"{need / 2**30:.2f} GiB ({ref.image.shape} voxels on the network's grid), "
                    f"above the per-scan budget of {budget / 2**30:.2f} GiB; raise "
                    "--max-scan-memory, or pass --threshold fixed to skip the calibration"
                )

    @property
    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            self._segmenter = Segmenter(
                self.network.model,
                self.tasks,
                self.network.crop,
                self.network.max_group,
                self.options.device,
                self.options.window_batch,
                self.options.overlap,
                zoom_refine=self.options.zoom_refine,
            )
        return self._segmenter

    def provenance(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.network.source),
            "spacing_source": self.spacing_source,
            "task_file": self.task_file,
            "references": self.tasks.references,
        }

    def results(self, workers: int = 1, dask_address: str | None = None) -> Iterator[SegmentResult]:
        """One result per query; with ``workers > 1`` or ``dask_address``, on Dask."""
        self.out.mkdir(parents=True, exist_ok=True)
        if workers <= 1 and not dask_address:
            for query in self.queries:
                yield segment_query(
                    query, self.segmenter, self.spacing, self.options, self.out,
                    self.network.sha256, self.task_sha256, self.provenance(), self.thresholds,
                )  # fmt: skip
            return
        from .cluster import segment_on_dask

        # workers in other processes load the network and this exact task set from files
        shipped = self.out / f".task-{self.task_sha256[:16]}.safetensors"
        save_tasks(self.tasks, shipped)
        try:
            yield from segment_on_dask(self, str(shipped), workers, dask_address)
        finally:
            shipped.unlink(missing_ok=True)


def _select(tasks: TaskSet, labels: str) -> TaskSet:
    """The classes of a task file that ``labels`` names (values or names)."""
    wanted = [s.strip() for s in labels.split(",") if s.strip()]
    idx = []
    for item in wanted:
        hits = [
            i for i, (v, n) in enumerate(zip(tasks.values, tasks.names, strict=True))
            if item == str(v) or item.lower() == n.lower()
        ]  # fmt: skip
        if not hits:
            raise SegmentError(
                f"--labels {item!r}: the task holds {dict(zip(tasks.values, tasks.names, strict=True))}"
            )
        idx.append(hits[0])
    return tasks.select(idx)


def segment(
    checkpoint: str,
    queries: Sequence[str],
    *,
    references: Sequence[tuple[str, str]] | None = None,
    task: str | None = None,
    labels: str | None = None,
    label_names: str | None = None,
    out: str | Path = "segmentations",
    save_task: str | None = None,
    workers: int = 1,
    dask_address: str | None = None,
    **options: Any,
) -> Iterator[SegmentResult]:
    """Segment ``queries`` (files, folders, manifests) with a network; yields results.

    ``references``: (image, mask) pairs, or ``task``: a task file, or neither for a
    fine-tuned network. ``options`` are `SegmentOptions` fields (spacing, modality, device,
    save_probabilities, largest_component, reference_zoom, max_zoom, zoom_refine, ...).
    Usage errors raise `SegmentError` at once.
    """
    run = SegmentRun(
        checkpoint,
        queries,
        references=references,
        task=task,
        labels=labels,
        label_names=label_names,
        out=out,
        save_task=save_task,
        options=SegmentOptions(**options),
    )
    return run.results(workers, dask_address)


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
