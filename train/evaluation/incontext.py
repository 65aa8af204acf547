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
(``sliding.py``); probabilities ``>= 0.5`` are foreground; Dice, HD95, ASD and NSD at
the bank's spacing (``metrics.py``).

Means follow the published aggregation (``aggregate.py``): per class over its
queries, per dataset over classes, the headline over datasets, with bootstrap
intervals and paired tests against the first network. Per shot count they cover
only the classes scorable at every requested k (those dropped are listed).

Anything with ``label``, ``crop`` and ``segment(query, tasks)`` runs in the same loop
(``Segmenter``): the networks, and the registration baseline.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from scipy import ndimage

from maskbank.train.incontext_net import TaskEmbedding

from . import aggregate
from .checkpoint import LoadedNetwork
from .errors import EvaluationError
from .metrics import binarise, is_miss, score
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
FP_MIN_VOXELS = 10


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

    @property
    def max_shots(self) -> int:
        return max(int(k) for k in self.shots)


@runtime_checkable
class Segmenter(Protocol):
    """What the evaluation loop runs: a network (``InContextEvaluator``) or a baseline."""

    label: str
    crop: int | None

    def segment(
        self, query: LabelledScan, tasks: list[tuple[StructureClass, list[LabelledScan]]]
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Yield (task indices, float32 probabilities (len(ids), *query.image.shape))."""
        ...


@dataclass
class DatasetSplit:
    """References per class and the queries of one dataset in one repeat."""

    dataset: str
    repeat: int
    references: dict[int, list[str]]  # class value -> reference pool (the largest k's)
    queries: list[str]
    excluded: dict[str, str]  # scan -> why it is not a query

    def to_dict(self, names: dict[int, str]) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "repeat": self.repeat,
            "classes": {
                names.get(v, str(v)): {"value": v, "references": list(ids)}
                for v, ids in sorted(self.references.items())
            },
            "queries": list(self.queries),
            "excluded": dict(sorted(self.excluded.items())),
        }


class ReferencePlan:
    """Which scans are references (per dataset, class and repeat) and which are queries."""

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

    def _named(self, cls: StructureClass) -> list[str]:
        assert self.named is not None
        listed = self.named.get(cls.dataset, [])
        if isinstance(listed, dict):
            listed = listed.get(cls.name, listed.get(str(cls.value), []))
        return [str(s) for s in listed]

    def named_scans(self, dataset: str) -> set[str]:
        """Every scan the references file names for ``dataset`` (none of them is a query)."""
        if self.named is None:
            return set()
        listed = self.named.get(dataset, [])
        if isinstance(listed, dict):
            return {str(s) for ids in listed.values() for s in ids}
        return {str(s) for s in listed}

    def candidates(self, cls: StructureClass, repeat: int = 0) -> list[str]:
        """The class's holders in reference order (fixed: sorted id; random: seeded)."""
        if self.named is not None:
            return [s for s in self._named(cls) if s in cls.scans]
        if self.options.references != RANDOM_REFS:
            return list(cls.scans)

        # One seeded order of the dataset's scans per repeat, shared by its classes, so
        # organs labelled in every scan share references (and leave more queries).
        def rank(scan: str) -> int:
            return zlib.crc32(f"{self.options.seed}\0{repeat}\0{cls.dataset}\0{scan}".encode())

        return sorted(cls.scans, key=lambda s: (rank(s), s))

    def pool(self, cls: StructureClass, repeat: int = 0) -> list[str]:
        """The references of the largest requested k this class supports.

        From its holders a class can serve k shots when another holder is left as a query
        (k < holders); scans named in a references file are never queries, so there any
        k up to the named count. A k too large for a class takes no scan from its queries.
        """
        cand = self.candidates(cls, repeat)
        fits = [k for k in self.options.shots if (k <= len(cand) if self.named else k < len(cand))]
        return cand[: max(fits, default=0)]

    def choose(self, cls: StructureClass, k: int, repeat: int = 0) -> list[str] | str:
        """The k references (a prefix of the pool), or the reason there are not enough."""
        pool = self.pool(cls, repeat)
        if len(pool) < k:
            if self.named is not None:
                n = len(self.candidates(cls, repeat))
                return (
                    f"{n} scan(s) of dataset {cls.dataset!r} holding it are named in the "
                    f"references file; {k} shot(s) need {k} references"
                )
            return (
                f"{len(cls.scans)} scan(s) of dataset {cls.dataset!r} hold it; {k} shot(s) "
                f"need {k} references and one more holder to be the query"
            )
        return pool[:k]

    def split(
        self,
        dataset: str,
        classes: list[StructureClass],
        scans: list[LabelledScan],
        repeat: int = 0,
    ) -> DatasetSplit:
        """References per class; queries = the other scans, never of a reference's subject."""
        references = {c.value: self.pool(c, repeat) for c in classes}
        refs = set().union(*references.values(), self.named_scans(dataset))
        subject = {s.scan_id: s.subject for s in scans}
        ref_subjects = {subject[r]: r for r in sorted(refs) if r in subject}
        queries, excluded = [], {}
        for s in scans:
            if s.scan_id in refs:
                excluded[s.scan_id] = "reference"
            elif s.subject in ref_subjects:
                excluded[s.scan_id] = f"same subject as reference {ref_subjects[s.subject]}"
            else:
                queries.append(s.scan_id)
        return DatasetSplit(dataset, repeat, references, queries, excluded)


class InContextEvaluator:
    """A loaded network as a ``Segmenter``: task embeddings from references, then windows."""

    def __init__(self, net: LoadedNetwork, options: InContextOptions) -> None:
        self.net = net
        self.label = net.label
        self.crop: int | None = net.crop
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
        """Probabilities of the given classes, one fixed task group at a time.

        The global task is the mean over every reference of every task given, so for one
        task list it is the same whatever the query.
        """
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


def refuse_untrained_incontext(net: LoadedNetwork) -> None:
    """A checkpoint of another pretext has a trained encoder only: in-context it is the floor."""
    if net.sha256 is not None and net.pretext != "incontext":
        raise EvaluationError(
            f"{net.source} was pretrained with pretext {net.pretext!r}: only its encoder is "
            "trained, the task encoder and decoder are the untrained ones of "
            "`--checkpoint random`, so its in-context numbers would be the floor's. Compare "
            "pretexts with `maskbank evaluate finetune` or `maskbank evaluate probe`"
        )


def pretraining_overlap(
    networks: Sequence[Any], scans: Sequence[LabelledScan]
) -> tuple[list[str], dict[str, Any]]:
    """Scans of ``scans`` a network was pretrained on (by scan id or source content hash).

    Returns the sorted overlapping scan ids (all networks) and per network the ids, or
    "not recorded" for a checkpoint that does not list its pretraining scans. The
    evaluation passes its queries: a reference seen in pretraining is no leak (its label
    is given to the network anyway), a query seen in pretraining is.
    """
    detail: dict[str, Any] = {}
    overlap: set[str] = set()
    for net in networks:
        if not isinstance(net, LoadedNetwork) or net.sha256 is None:
            continue  # the untrained floor and baselines saw no scan
        record = net.pretraining_scans
        if record is None:
            detail[net.label] = "not recorded"
            continue
        ids = {str(r.get("scan_id")) for r in record}
        hashes = {str(r.get("source_sha256")) for r in record if r.get("source_sha256")}
        hits = sorted(
            s.scan_id
            for s in scans
            if s.scan_id in ids or str(s.scan.attrs.get("source_sha256")) in hashes
        )
        detail[net.label] = hits
        overlap.update(hits)
    return sorted(overlap), detail


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
    plan = ReferencePlan(options)
    out: set[str] = set()
    for dataset in sorted({c.dataset for c in classes}):
        dclasses = [c for c in classes if c.dataset == dataset]
        dscans = [s for s in scans if s.dataset == dataset]
        for rep in range(plan.repeats):
            out.update(plan.split(dataset, dclasses, dscans, rep).queries)
    return sorted(out)


@dataclass
class QueryJob:
    """One query segmented for the task list of its dataset at (k, repeat)."""

    query: LabelledScan
    shots: int
    repeat: int
    tasks: list[tuple[StructureClass, list[str]]]


def _fp_component(pred: np.ndarray) -> int:
    """Voxels of the largest connected (26-neighbour) component of ``pred``."""
    if not pred.any():
        return 0
    labels, n = ndimage.label(pred, structure=np.ones((3, 3, 3), bool))
    return int(np.bincount(labels.ravel())[1:].max()) if n else 0


def evaluate_incontext(
    bank,
    networks: Sequence[LoadedNetwork | Segmenter],
    options: InContextOptions,
    scan_ids: list[str] | None = None,
    progress: bool = True,
    figures_dir: str | Path | None = None,
    on_prediction: Callable[[str, QueryJob, StructureClass, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Score every network or baseline on every (query, class, k, repeat); the results dict.

    ``on_prediction(label, job, class, probabilities)`` sees every probability map (tests
    compare them bit for bit; a caller may save them).
    """
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
    by_id = {s.scan_id: s for s in scans}
    plan = ReferencePlan(options)
    by_dataset: dict[str, list[StructureClass]] = defaultdict(list)
    for c in classes:
        by_dataset[c.dataset].append(c)

    jobs: list[QueryJob] = []
    splits: list[DatasetSplit] = []
    not_scored = [{**s, "shots": None} for s in skipped]
    scorable: dict[int, set[tuple[str, int]]] = {k: set() for k in options.shots}
    for dataset, dclasses in sorted(by_dataset.items()):
        dscans = [s for s in scans if s.dataset == dataset]
        for rep in range(plan.repeats):
            split = plan.split(dataset, dclasses, dscans, rep)
            splits.append(split)
            if not split.queries:
                not_scored.append(
                    {
                        "dataset": dataset,
                        "class": None,
                        "repeat": rep,
                        "reason": f"all {len(dscans)} labelled scans of dataset {dataset!r} "
                        "are references (or of a reference's subject) for up to "
                        f"{options.max_shots} shot(s): no query is left",
                    }
                )
            holders = {c.value: set(c.scans) & set(split.queries) for c in dclasses}
            for k in options.shots:
                tasks = []
                for c in dclasses:
                    refs = plan.choose(c, k, rep)
                    if isinstance(refs, str):
                        if rep == 0:
                            not_scored.append(
                                {"dataset": dataset, "class": c.name, "shots": k, "reason": refs}
                            )
                        continue
                    tasks.append((c, refs))
                    if holders[c.value]:
                        scorable[k].add(c.ident)
                    elif rep == 0 and split.queries:
                        not_scored.append(
                            {
                                "dataset": dataset,
                                "class": c.name,
                                "shots": k,
                                "reason": "no query holds it: every scan labelled with it is a "
                                "reference (its false positives on the queries are still scored)",
                            }
                        )
                if tasks:
                    jobs += [QueryJob(by_id[q], k, rep, tasks) for q in split.queries]
    unsupported = [k for k in options.shots if not scorable[k]]
    if unsupported:
        why = "; ".join(
            dict.fromkeys(
                n["reason"] if n["class"] is None else f"{n['dataset']}/{n['class']}: {n['reason']}"
                for n in not_scored
                if n.get("shots") in unsupported or n["class"] is None
            )
        )
        raise EvaluationError(
            f"no structure class can be scored with {unsupported} shot(s) (k references and "
            f"a query holding the class): {why[:600] or 'no class'}; lower --shots or add "
            "labelled scans"
        )
    common = set.intersection(*scorable.values())
    if not common:
        raise EvaluationError(
            f"no structure class is scorable at every requested k {list(options.shots)}; "
            "evaluate the shot counts separately"
        )
    dropped = {
        k: sorted(f"{d}/{_name(classes, d, v)}" for d, v in scorable[k] - common)
        for k in options.shots
    }

    runners: list[Segmenter] = [
        InContextEvaluator(n, options) if isinstance(n, LoadedNetwork) else n for n in networks
    ]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs) * len(runners), desc="evaluate incontext", unit="query")
    structures, queries, figure_cases = [], [], {}
    for runner in runners:
        for job in jobs:
            query = job.query
            refs = [(c, [by_id[r] for r in ids]) for c, ids in job.tasks]
            voxel_ml = float(np.prod(query.spacing)) / 1000.0
            t0 = time.perf_counter()
            passes = 0
            for group, probs in runner.segment(query, refs):
                passes += 1
                for j, prob in zip(group, probs, strict=True):
                    cls, ids = job.tasks[j]
                    if on_prediction is not None:
                        on_prediction(runner.label, job, cls, prob)
                    pred = binarise(prob)
                    gt = query.mask(cls.value)
                    row = _score_row(pred, gt, query, cls, options, voxel_ml)
                    structures.append(
                        {
                            "network": runner.label,
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
                    case = (runner.label, cls.key)
                    drawn = {c for _, c in figure_cases}
                    if (
                        figures_dir is not None
                        and row["present"]
                        and case not in figure_cases
                        and (cls.key in drawn or len(drawn) < options.max_figures)
                    ):
                        figure_cases[case] = (cls, by_id[ids[0]], query, pred)
            queries.append(
                {
                    "network": runner.label,
                    "query": query.scan_id,
                    "shots": job.shots,
                    "repeat": job.repeat,
                    "classes": len(job.tasks),
                    "shape": list(query.image.shape),
                    # inference and scoring of the whole query, all its dataset's classes
                    "seconds": time.perf_counter() - t0,
                    "passes": passes,
                    "windows": (
                        window_count(query.image.shape, runner.crop, options.overlap) * passes
                        if runner.crop
                        else None
                    ),
                }
            )
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    figures = []
    if figures_dir is not None:
        crop = next((r.crop for r in runners if r.crop), 64)
        figures = write_overlays(Path(figures_dir), figure_cases, crop)
    queried = sorted({q for sp in splits for q in sp.queries})
    overlap, overlap_detail = pretraining_overlap(networks, [by_id[q] for q in queried])
    names = {c.ident: c.name for c in classes}
    results = summarise(
        [r.label for r in runners],
        options,
        structures,
        queries,
        not_scored,
        figures,
        common,
        dropped,
        window=next((r.crop for r in runners if r.crop), None),
    )
    results["classes"] = [
        {"dataset": c.dataset, "value": c.value, "class": c.name, "holders": list(c.scans)}
        for c in classes
    ]
    results["references"] = [
        sp.to_dict({v: names[(sp.dataset, v)] for v in sp.references}) for sp in splits
    ]
    results["pretraining_overlap"] = overlap
    results["pretraining_overlap_by_network"] = overlap_detail
    results["baselines"] = {
        r.label: r.stats()
        for r in runners
        if not isinstance(r, InContextEvaluator) and hasattr(r, "stats")
    }
    return results


def _name(classes: list[StructureClass], dataset: str, value: int) -> str:
    return next((c.name for c in classes if c.ident == (dataset, value)), str(value))


def _score_row(
    pred: np.ndarray,
    gt: np.ndarray,
    query: LabelledScan,
    cls: StructureClass,
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
    component = _fp_component(pred)
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


def class_table(rows: list[dict]) -> list[dict[str, Any]]:
    """Per class: means over present queries, misses, and false positives where absent."""
    by_class: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_class[(r["dataset"], r["class"])].append(r)
    table = []
    for (dataset, name), rs in sorted(by_class.items()):
        present = [r for r in rs if r["present"]]
        absent = [r for r in rs if not r["present"]]
        entry: dict[str, Any] = {"dataset": dataset, "class": name, "value": rs[0]["value"]}
        entry["queries"] = len(present)
        for m in aggregate.METRICS:
            entry[m] = float(np.mean([r[m] for r in present])) if present else None
        entry["hd95_median"] = float(np.median([r["hd95"] for r in present])) if present else None
        entry["misses"] = sum(bool(r["miss"]) for r in present)
        entry["absent_queries"] = len(absent)
        entry["fp_queries"] = sum(bool(r["false_positive"]) for r in absent)
        entry["fp_rate"] = entry["fp_queries"] / len(absent) if absent else None
        entry["fp_ml_mean"] = float(np.mean([r["fp_ml"] for r in absent])) if absent else None
        table.append(entry)
    return table


def summarise(
    labels: list[str],
    options: InContextOptions,
    structures: list[dict],
    queries: list[dict],
    not_scored: list[dict],
    figures: list[str],
    common: set[tuple[str, int]] | None = None,
    dropped: dict[int, list[str]] | None = None,
    window: int | None = None,
) -> dict[str, Any]:
    """Per network and k: the published means with CIs, per dataset and class, paired tests.

    ``mean_dice`` is the first network's headline at the fewest shots.
    """
    if common is None:
        common = {(r["dataset"], r["value"]) for r in structures}
    dropped = dropped or {}
    summary = []
    for label in labels:
        for k in options.shots:
            rows = [
                r
                for r in structures
                if r["network"] == label
                and r["shots"] == k
                and (r["dataset"], r["value"]) in common
            ]
            if not rows:
                continue
            present = [r for r in rows if r["present"]]
            stats = aggregate.summary(present, options.bootstrap, options.seed)
            secs = [q["seconds"] for q in queries if q["network"] == label and q["shots"] == k]
            classes = class_table(rows)
            per_dataset = defaultdict(list)
            for c in classes:
                per_dataset[c["dataset"]].append(c)
            entry = {
                "network": label,
                "shots": k,
                **stats,
                "median_hd95": float(np.median([r["hd95"] for r in present])) if present else None,
                "structures": len(present),
                "classes_scored": len(classes),
                "misses": sum(bool(r["miss"]) for r in present),
                "absent_rows": len(rows) - len(present),
                "false_positives": sum(bool(r.get("false_positive")) for r in rows),
                "seconds_per_query": float(np.mean(secs)) if secs else None,
                "datasets": [
                    {
                        "dataset": d,
                        "mean_dice": (stats.get("datasets") or {}).get(d),
                        "classes": len(cs),
                    }
                    for d, cs in sorted(per_dataset.items())
                ],
                "classes": classes,
                "dropped": dropped.get(k, []),
            }
            entry["class_ci"] = {
                f"{c['dataset']}/{c['class']}": aggregate.bootstrap_ci(
                    [
                        r
                        for r in present
                        if (r["dataset"], r["class"]) == (c["dataset"], c["class"])
                    ],
                    "dice",
                    options.bootstrap,
                    options.seed,
                )
                for c in classes
            }
            if label != labels[0]:
                first = [
                    r
                    for r in structures
                    if r["network"] == labels[0]
                    and r["shots"] == k
                    and (r["dataset"], r["value"]) in common
                ]
                entry["paired"] = {
                    m: aggregate.paired(present, first, m, options.bootstrap, options.seed)
                    for m in ("dice", "hd95")
                }
            summary.append(entry)
    k0 = min(options.shots)
    heads = {s["network"]: s for s in summary if s["shots"] == k0}
    head = heads.get(labels[0])
    networks = []
    for label in labels:
        s = heads.get(label)
        if s is None:
            continue
        paired_dice = (s.get("paired") or {}).get("dice")
        networks.append(
            {
                "name": label,
                "shots": k0,
                "mean_dice": s["mean_dice"],
                "mean_dice_ci": s["mean_dice_ci"],
                "mean_hd95": s["mean_hd95"],
                "median_hd95": s["median_hd95"],
                "mean_asd": s["mean_asd"],
                "mean_nsd": s["mean_nsd"],
                "misses": s["misses"],
                "seconds_per_query": s["seconds_per_query"],
                "paired": (
                    {k: paired_dice[k] for k in ("diff", "ci", "p", "pairs")}
                    if paired_dice
                    else None
                ),
            }
        )
    return {
        "evaluation": "incontext",
        "options": {
            "shots": list(options.shots),
            "references": options.references,
            "repeats": options.repeats if options.references == RANDOM_REFS else 1,
            "seed": options.seed,
            "overlap": options.overlap,
            "threshold": ">= 0.5",
            "tolerance_mm": options.tolerance_mm,
            "fp_min_voxels": options.fp_min_voxels,
            "bootstrap": options.bootstrap,
            "label_names": (
                {str(k): v for k, v in sorted(options.label_names.items())}
                if options.label_names
                else None
            ),
            "window": window,
        },
        "headline": aggregate.HEADLINE_IS,
        "mean_dice": head["mean_dice"] if head else None,
        "mean_dice_ci": head["mean_dice_ci"] if head else None,
        "micro_dice": head["micro_dice"] if head else None,
        "datasets": head["datasets"] if head else [],
        "misses": head["misses"] if head else None,
        "networks": networks,
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
