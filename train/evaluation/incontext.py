"""In-context few-shot segmentation of labelled structures (the published protocol).

For every structure class and every query scan holding it, k reference scans of the
same dataset other than the query give the task: a crop of the network's training
crop size centred on the class's median foreground voxel, with the class's mask.
With several references the task embeddings are averaged. The query is the whole
scan, segmented by sliding windows (``sliding.py``); sigmoid, threshold 0.5; Dice,
HD95 and NSD at the bank's spacing (``metrics.py``).

As in pretraining, an all-ones "global" task rides along with the classes (its
embedding averaged over every reference of the query); classes share passes in
fixed groups of the K the network was trained with.

Reference choice: ``fixed`` takes the first k scans holding the class in sorted id
order (or the scans a JSON file names, per dataset or per dataset and class);
``random`` draws k of them, seeded by (seed, repeat, class, query), ``repeats`` times.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.incontext_net import TaskEmbedding

from .checkpoint import LoadedNetwork
from .errors import EvaluationError
from .metrics import SegScores, mean_scores, score
from .sliding import iter_sliding_probabilities, task_groups, window_count
from .structures import (
    LabelledScan,
    StructureClass,
    centred_crop,
    find_classes,
    labelled_scans,
    median_foreground,
    require_classes,
)

FIXED, RANDOM_REFS = "fixed", "random"


@dataclass(frozen=True)
class InContextOptions:
    shots: tuple[int, ...] = (1,)
    references: str = FIXED  # fixed | random | path of a JSON file naming reference scans
    repeats: int = 3  # draws per (class, query, k) with random references
    seed: int = 0
    overlap: float = 0.5
    window_batch: int = 2
    tolerance_mm: float = 2.0
    max_output_bytes: int = 1 << 30
    device: str = "cpu"
    max_figures: int = 48
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shots or any(int(k) < 1 for k in self.shots):
            raise EvaluationError(f"--shots must be positive integers, got {self.shots}")
        if self.references not in (FIXED, RANDOM_REFS) and not Path(self.references).is_file():
            raise EvaluationError(
                f"--references must be 'fixed', 'random' or a JSON file, got {self.references!r}"
            )


class ReferencePlan:
    """Which reference scans serve a (class, query, k, repeat)."""

    def __init__(self, options: InContextOptions) -> None:
        self.options = options
        self.named: dict[str, Any] | None = None
        if options.references not in (FIXED, RANDOM_REFS):
            try:
                self.named = json.loads(Path(options.references).read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise EvaluationError(f"{options.references}: not valid JSON ({exc})") from exc
            if not isinstance(self.named, dict):
                raise EvaluationError(
                    f"{options.references}: expected {{dataset: [scan ids]}} or "
                    "{dataset: {class: [scan ids]}}"
                )

    @property
    def repeats(self) -> int:
        return self.options.repeats if self.options.references == RANDOM_REFS else 1

    def candidates(self, cls: StructureClass, query: str) -> list[str]:
        holders = [s for s in cls.scans if s != query]
        if self.named is None:
            return holders
        listed = self.named.get(cls.dataset, [])
        if isinstance(listed, dict):
            listed = listed.get(cls.name, listed.get(str(cls.value), []))
        return [s for s in listed if s in holders]

    def choose(self, cls: StructureClass, query: str, k: int, repeat: int) -> list[str] | str:
        """The reference ids, or the reason there are not enough."""
        cand = self.candidates(cls, query)
        if len(cand) < k:
            where = "named in the references file" if self.named is not None else "hold it"
            return (
                f"{len(cand)} other scan(s) of dataset {cls.dataset!r} {where}; "
                f"{k} shot(s) need {k}"
            )
        if self.options.references != RANDOM_REFS:
            return cand[:k]
        salt = zlib.crc32(f"{cls.key}\0{query}".encode())
        rng = np.random.default_rng([self.options.seed, repeat, k, salt])
        return [cand[i] for i in sorted(rng.choice(len(cand), size=k, replace=False))]


class InContextEvaluator:
    """Runs one network over every (query, k, repeat) of a labelled bank."""

    def __init__(self, net: LoadedNetwork, options: InContextOptions) -> None:
        self.net = net
        self.options = options
        self.device = torch.device(options.device)
        self.model = net.model.to(self.device).eval()
        self.max_group = int(net.config.get("data", {}).get("k", 13))
        self._tasks: dict[tuple[str, int], TaskEmbedding] = {}

    @torch.no_grad()
    def reference_tasks(self, scan: LabelledScan, value: int) -> TaskEmbedding:
        """(class, global) embedding of one reference: the crop centred on the class."""
        key = (scan.scan_id, value)
        if key not in self._tasks:
            size = self.net.crop
            mask = scan.mask(value)
            centre = median_foreground(mask)
            image = centred_crop(scan.image, centre, size, float(scan.image.min()))
            masks = np.stack([centred_crop(mask, centre, size, False), np.ones((size,) * 3, bool)])
            img_t = torch.from_numpy(image)[None, None].to(self.device)
            mask_t = torch.from_numpy(masks)[None].float().to(self.device)
            self._tasks[key] = self.model.encode_tasks(img_t, mask_t)
        return self._tasks[key]

    def segment(
        self, query: LabelledScan, tasks: list[tuple[StructureClass, list[LabelledScan]]]
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Probabilities of the classes given with references, one task group at a time."""
        per_class, globals_ = [], []
        with torch.no_grad():
            for cls, refs in tasks:
                embs = [self.reference_tasks(r, cls.value) for r in refs]
                shots = TaskEmbedding.cat_batch(embs)
                per_class.append(shots.select([0]).mean())
                globals_.append(shots.select([1]))
            classes = TaskEmbedding.cat(per_class)
            global_task = TaskEmbedding.cat_batch(globals_).mean()
        groups = task_groups(
            len(tasks), query.image.size, self.max_group, self.options.max_output_bytes
        )

        def predict(x: torch.Tensor, ids: list[int]) -> torch.Tensor:
            group = TaskEmbedding.cat([classes.select(ids), global_task])
            return self.model.segment(x, group)[:, : len(ids)]

        return iter_sliding_probabilities(
            predict,
            query.image,
            groups,
            self.net.crop,
            overlap=self.options.overlap,
            window_batch=self.options.window_batch,
            device=self.device,
        )


def evaluate_incontext(
    bank,
    networks: list[LoadedNetwork],
    options: InContextOptions,
    scan_ids: list[str] | None = None,
    progress: bool = True,
    figures_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score every network on every (class, query, k, repeat); returns the results dict."""
    scans = labelled_scans(bank, scan_ids)
    classes, skipped = find_classes(scans)
    require_classes(classes, skipped, bank)
    by_id = {s.scan_id: s for s in scans}
    plan = ReferencePlan(options)
    by_dataset: dict[str, list[StructureClass]] = defaultdict(list)
    for c in classes:
        by_dataset[c.dataset].append(c)

    jobs = []  # (query, k, repeat, [(class, ref ids)])
    not_scored = list(skipped)
    for dataset, dclasses in sorted(by_dataset.items()):
        for query in (s for s in scans if s.dataset == dataset):
            for k in options.shots:
                for rep in range(plan.repeats):
                    tasks = []
                    for c in dclasses:
                        if query.scan_id not in c.scans:
                            if k == options.shots[0] and rep == 0:
                                not_scored.append(
                                    {
                                        "dataset": dataset,
                                        "class": c.name,
                                        "query": query.scan_id,
                                        "reason": "class absent in the query's label map",
                                    }
                                )
                            continue
                        refs = plan.choose(c, query.scan_id, k, rep)
                        if isinstance(refs, str):
                            not_scored.append(
                                {
                                    "dataset": dataset,
                                    "class": c.name,
                                    "query": query.scan_id,
                                    "shots": k,
                                    "reason": refs,
                                }
                            )
                            continue
                        tasks.append((c, refs))
                    if tasks:
                        jobs.append((query, k, rep, tasks))
    if not jobs:
        raise EvaluationError(
            "no (class, query) pair has enough reference scans for shots "
            f"{list(options.shots)}: {not_scored[0]['reason'] if not_scored else ''}"
        )

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs) * len(networks), desc="evaluate incontext", unit="query")
    structures, queries, figure_cases = [], [], {}
    for net in networks:
        evaluator = InContextEvaluator(net, options)
        for query, k, rep, tasks in jobs:
            refs = [(c, [by_id[r] for r in ids]) for c, ids in tasks]
            t0 = time.perf_counter()
            passes = 0
            for group, probs in evaluator.segment(query, refs):
                passes += 1
                for j, prob in zip(group, probs, strict=True):
                    cls, ids = tasks[j]
                    pred = prob > 0.5
                    gt = query.mask(cls.value)
                    sc = score(pred, gt, query.spacing, options.tolerance_mm)
                    structures.append(
                        {
                            "network": net.label,
                            "dataset": cls.dataset,
                            "class": cls.name,
                            "value": cls.value,
                            "query": query.scan_id,
                            "shots": k,
                            "repeat": rep,
                            "references": list(ids),
                            **sc.to_dict(),
                            "gt_voxels": int(gt.sum()),
                            "pred_voxels": int(pred.sum()),
                        }
                    )
                    case = (net.label, cls.key)
                    drawn = {c for _, c in figure_cases}
                    if (
                        figures_dir is not None
                        and case not in figure_cases
                        and (cls.key in drawn or len(drawn) < options.max_figures)
                    ):
                        figure_cases[case] = (cls, by_id[ids[0]], query, pred)
            queries.append(
                {
                    "network": net.label,
                    "query": query.scan_id,
                    "shots": k,
                    "repeat": rep,
                    "classes": len(tasks),
                    "shape": list(query.image.shape),
                    # inference and scoring of the whole query, all its classes
                    "seconds": time.perf_counter() - t0,
                    "passes": passes,
                    "windows": window_count(query.image.shape, net.crop, options.overlap) * passes,
                }
            )
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    figures = []
    if figures_dir is not None:
        figures = write_overlays(Path(figures_dir), figure_cases, networks[0].crop)
    return summarise(networks, options, structures, queries, not_scored, figures)


def _mean(rows: list[dict]) -> dict[str, float]:
    return mean_scores([SegScores(r["dice"], r["hd95"], r["nsd"]) for r in rows])


def summarise(
    networks: list[LoadedNetwork],
    options: InContextOptions,
    structures: list[dict],
    queries: list[dict],
    not_scored: list[dict],
    figures: list[str],
) -> dict[str, Any]:
    """Means per network and k, per class; ``mean_dice`` = first network at the fewest shots."""
    summary = []
    for net in networks:
        for k in options.shots:
            rows = [r for r in structures if r["network"] == net.label and r["shots"] == k]
            if not rows:
                continue
            per_class = defaultdict(list)
            for r in rows:
                per_class[(r["dataset"], r["class"])].append(r)
            secs = [q["seconds"] for q in queries if q["network"] == net.label and q["shots"] == k]
            summary.append(
                {
                    "network": net.label,
                    "shots": k,
                    **{f"mean_{m}": v for m, v in _mean(rows).items()},
                    "structures": len(rows),
                    "seconds_per_query": float(np.mean(secs)) if secs else None,
                    "classes": [
                        {"dataset": d, "class": c, "queries": len(v), **_mean(v)}
                        for (d, c), v in sorted(per_class.items())
                    ],
                }
            )
    first = [s for s in summary if s["network"] == networks[0].label]
    head = min(first, key=lambda s: s["shots"]) if first else None
    return {
        "evaluation": "incontext",
        "options": {
            "shots": list(options.shots),
            "references": options.references,
            "repeats": options.repeats if options.references == RANDOM_REFS else 1,
            "seed": options.seed,
            "overlap": options.overlap,
            "threshold": 0.5,
            "tolerance_mm": options.tolerance_mm,
            "window": networks[0].crop,
        },
        "mean_dice": head["mean_dice"] if head else None,
        "summary": summary,
        "structures": structures,
        "queries": queries,
        "not_scored": not_scored,
        "figures": figures,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


def write_overlays(out: Path, cases: dict[tuple[str, str], tuple], crop: int) -> list[str]:
    """Per class and network: reference / query / prediction / ground truth on one slice.

    The slice is the axial slice of the query with most ground-truth foreground; the
    reference panel is the reference crop's slice through its centre (its mask outlined).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for (label, key), (cls, ref, query, pred) in sorted(cases.items()):
        gt = query.mask(cls.value)
        z = int(np.argmax(gt.sum(axis=(0, 1))))
        rmask = ref.mask(cls.value)
        centre = median_foreground(rmask)
        rimg = centred_crop(ref.image, centre, crop, float(ref.image.min()))[:, :, crop // 2]
        rm = centred_crop(rmask, centre, crop, False)[:, :, crop // 2]
        qimg = query.image[:, :, z]
        panels = [
            (f"reference {ref.scan_id}", rimg, rm, "tab:orange"),
            (f"query {query.scan_id} z={z}", qimg, None, None),
            ("prediction", qimg, pred[:, :, z], "tab:red"),
            ("ground truth", qimg, gt[:, :, z], "tab:green"),
        ]
        fig, axes = plt.subplots(1, 4, figsize=(12, 3.4), dpi=100)
        for ax, (title, img, mask, colour) in zip(axes, panels, strict=True):
            ax.imshow(img.T, cmap="gray", origin="lower")
            if mask is not None and mask.any():
                overlay = np.ma.masked_where(~mask.T, mask.T)
                ax.imshow(
                    overlay,
                    cmap=matplotlib.colors.ListedColormap([colour]),
                    alpha=0.45,
                    origin="lower",
                )
                ax.contour(mask.T, levels=[0.5], colors=[colour], linewidths=0.8)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{key} — {label}", fontsize=10)
        fig.tight_layout()
        path = out / f"incontext_{_slug(label)}_{_slug(key)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(str(path))
    return paths
