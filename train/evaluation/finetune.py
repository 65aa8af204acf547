"""Label-efficient fine-tuning: the pretrained network vs the same network from scratch.

The question is whether pretraining saves labels, so both networks get exactly the
same budget: the same splits, scans, crops, steps, optimiser, schedule and learning
rate grid; only the initial weights differ.

* **Splits** (``splits.py``): per dataset, seeded; a fraction of the training scans
  (nested across fractions) trains, the validation scans select the weights and the
  learning rate, the test scans are scored once with the selected weights. Several
  ``split_seeds`` repeat everything on independent splits; results report the mean
  and the standard deviation across them (the spread a single split hides).
* **Model** (``finetune_model.py``): the in-context network with a fixed set of classes,
  each class's task embedding initialised from its training references; every weight
  trains (adaptive Tversky + BCE). A class that no training scan of a fraction holds is
  reported in ``untrained_classes``: that is what those labels cost.
* **Crops** (``finetune_data.py``): the same for every network and rate.
* **Recipe and selection** (``finetune_training.py``): AdamW with one-cycle warm-up at
  each rate of ``lr_grid``; each network keeps its best (rate, step) on validation Dice.
* **Headline** (``aggregate.headline``, as the in-context evaluation and published
  tables): per class the mean over its test scans, per dataset the mean over its
  classes, then the mean over datasets; the micro mean is reported beside it.

Each run records which scans every phase read (``reads``), so a test can prove that
test scans never reach training or selection.

The steps: ``plan`` (splits, checked before any training), ``score`` (every split seed,
fraction and network), ``summarise`` (mean and sd across seeds) into a ``FinetuneResult``
(``finetune_report.py``); ``run`` does all of them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .checkpoint import RANDOM, SCRATCH, LoadedNetwork
from .errors import EvaluationError
from .finetune_data import PHASES, ScanAccess
from .finetune_model import HEADLINE_IS, METRICS, scored_classes
from .finetune_report import FinetuneResult
from .finetune_training import OPTIMIZER, finetune_once
from .result import record
from .splits import Split, check_fraction, make_split
from .structures import LabelledScan, StructureClass, find_classes, labelled_scans

LR_GRID = (3e-4, 1e-3, 3e-3)
PRETRAINED = "pretrained"

OnRun = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class FinetuneOptions:
    """Budget and protocol, identical for every network of one evaluation."""

    fractions: tuple[float, ...] = (0.1, 0.2, 0.4, 1.0)
    steps: int = 100  # per learning rate; a CPU demo, real comparisons use thousands
    val_every: int = 25
    batch_size: int = 2
    lr_grid: tuple[float, ...] = LR_GRID  # peak AdamW rates, one run each, chosen on validation
    split_seeds: tuple[int, ...] = (0,)
    weight_decay: float = 0.01  # AdamW, on weights of >= 2 dims (not norms, biases, tasks)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_frac: float = 0.1  # one-cycle: linear warm-up, then cosine down
    grad_clip: float = 1.0  # gradient norm clip (0: none)
    seed: int = 0
    fg_share: float = 0.5  # share of crops centred near a labelled voxel
    overlap: float = 0.5
    window_batch: int = 2
    tolerance_mm: float = 2.0
    device: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.fractions:
            raise EvaluationError("give at least one label fraction, e.g. --fractions 0.1,1.0")
        for f in self.fractions:
            check_fraction(f)
        if self.steps < 1 or self.val_every < 1 or self.batch_size < 1:
            raise EvaluationError(
                f"--steps ({self.steps}), --val-every ({self.val_every}) and --batch-size "
                f"({self.batch_size}) must be >= 1"
            )
        grid = tuple(float(lr) for lr in self.lr_grid)
        if not grid or not all(np.isfinite(lr) and lr > 0 for lr in grid):
            raise EvaluationError(
                f"--lr-grid must be positive learning rates, e.g. 3e-4,1e-3,3e-3; got {grid}"
            )
        if len(set(grid)) != len(grid):
            raise EvaluationError(f"--lr-grid lists a rate twice: {grid}")
        object.__setattr__(self, "lr_grid", tuple(sorted(grid)))
        seeds = tuple(self.split_seeds)
        if not seeds or any(int(s) != s or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise EvaluationError(
                f"--split-seeds must be distinct integers >= 0, e.g. 0,1,2; got {seeds}"
            )
        object.__setattr__(self, "split_seeds", tuple(int(s) for s in seeds))
        if not (0 <= self.warmup_frac <= 1 and self.weight_decay >= 0 and self.grad_clip >= 0):
            raise EvaluationError(
                "warmup_frac must lie in [0, 1], weight_decay and grad_clip must be >= 0"
            )

    def recipe(self) -> dict[str, Any]:
        """The optimiser as results record it."""
        return {
            "name": OPTIMIZER,
            "lr_grid": list(self.lr_grid),
            "lr_chosen_on": "validation Dice, per network (ties: the smaller rate)",
            "betas": list(self.betas),
            "weight_decay": self.weight_decay,
            "warmup_frac": self.warmup_frac,
            "schedule": "one-cycle (linear warm-up, cosine to 1 % of the peak)",
            "grad_clip": self.grad_clip,
            "steps_per_rate": self.steps,
        }


@dataclass
class FinetunePlan:
    """The named networks, their shared crop, the scans and every split with its classes."""

    networks: list[tuple[str, LoadedNetwork]]
    crop: int
    scans: list[LabelledScan]
    access: ScanAccess
    splits: list[tuple[Split, list[StructureClass]]]


def network_name(net: LoadedNetwork) -> str:
    """'scratch' for an untrained network, else 'pretrained' (the names results use)."""
    return SCRATCH if net.source in (SCRATCH, RANDOM) else PRETRAINED


def _named(networks: Sequence[LoadedNetwork | tuple[str, LoadedNetwork]]) -> list:
    named = [n if isinstance(n, tuple) else (network_name(n), n) for n in networks]
    names = [name for name, _ in named]
    if not named or len(set(names)) != len(names):
        raise EvaluationError(
            f"fine-tuning needs networks of distinct names, got {names}; give (name, network) "
            "pairs to name them"
        )
    return named


def _check_split(split: Split, scans: Sequence[LabelledScan], bank) -> list[StructureClass]:
    """The split's classes (from its training scans only); fails when it cannot be scored."""
    train_ids = set(split.train_ids)
    classes, _ = find_classes([s for s in scans if s.scan_id in train_ids], min_scans=1)
    if not classes:
        raise EvaluationError(
            f"no training scan of bank {bank.location} (split seed {split.seed}) holds "
            "a labelled structure; label more scans or try other --split-seeds"
        )
    # A precondition on label values only (outside the read log): without a class in the
    # validation and the test scans there is nothing to select on or to score.
    for part, ids in (("validation", split.validation_ids), ("test", split.test_ids)):
        if not any(scored_classes(classes, s) for s in scans if s.scan_id in set(ids)):
            raise EvaluationError(
                f"the split of seed {split.seed} leaves no {part} scan of bank "
                f"{bank.location} holding a class of the training scans; label more scans "
                "or try other --split-seeds"
            )
    return classes


def plan(
    bank,
    networks: Sequence[LoadedNetwork | tuple[str, LoadedNetwork]],
    options: FinetuneOptions,
    scan_ids: list[str] | None = None,
) -> FinetunePlan:
    """Name the networks, check they share a crop, make and check every split."""
    named = _named(networks)
    crops = {net.crop for _, net in named}
    if len(crops) != 1:
        raise EvaluationError(
            f"the networks train on different crops {sorted(crops)}; compare networks of "
            "one preset (the scratch baseline takes the checkpoint's)"
        )
    scans = labelled_scans(bank, scan_ids)
    datasets = {s.scan_id: s.dataset for s in scans}
    # A subject's scans (follow-ups, other sequences) stay in one part of every split.
    subjects = {s.scan_id: s.subject for s in scans if s.subject != s.scan_id}
    splits = []
    for seed in options.split_seeds:  # every split checked before any training
        split = make_split(datasets, seed, subjects)
        splits.append((split, _check_split(split, scans, bank)))
    return FinetunePlan(named, crops.pop(), scans, ScanAccess(scans), splits)


def _run_one(
    planned: FinetunePlan,
    split: Split,
    classes: list[StructureClass],
    fraction: float,
    name: str,
    net: LoadedNetwork,
    options: FinetuneOptions,
    save_model: str | None,
) -> dict[str, Any]:
    access = planned.access
    access.clear()
    saver = None
    first = split is planned.splits[0][0] and name == planned.networks[0][0]
    if save_model and first and fraction == max(options.fractions):
        from maskbank.train.segment.saved_model import finetuned_saver

        saver = finetuned_saver(save_model, list(classes), net.preset, planned.crop, planned.scans)
    run = finetune_once(net, name, classes, split, fraction, access, planned.crop, options, saver)
    run["reads"] = access.snapshot()
    run["read_counts"] = {p: access.counts.get(p, 0) for p in PHASES}
    return run


def score(
    planned: FinetunePlan,
    options: FinetuneOptions,
    on_run: OnRun | None = None,
    save_model: str | None = None,
) -> list[dict[str, Any]]:
    """Every (split seed, fraction, network) run, each reported to ``on_run`` when done.

    ``save_model``: a folder for the first network's selected weights and class embeddings
    at the first split seed's largest fraction (``train.segment.saved_model``).
    """
    runs = []
    for split, classes in planned.splits:
        for fraction in options.fractions:
            for name, net in planned.networks:
                run = _run_one(planned, split, classes, fraction, name, net, options, save_model)
                runs.append(run)
                if on_run is not None:
                    on_run(run)
    return runs


def _spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None from a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def across_seeds(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (fraction, network): every headline metric's mean and sd over the split seeds."""
    groups: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["fraction"], r["network"])].append(r)
    out = []
    for (fraction, network), rs in groups.items():
        row: dict[str, Any] = {
            "network": network,
            "fraction": fraction,
            "split_seeds": [r["split_seed"] for r in rs],
        }
        for m in METRICS:
            mean, sd = _spread([r["test"][f"mean_{m}"] for r in rs])
            row[f"mean_{m}"], row[f"sd_{m}"] = mean, sd
        row["per_seed"] = {str(r["split_seed"]): r["test"]["mean_dice"] for r in rs}
        row["lr"] = {str(r["split_seed"]): r["lr"] for r in rs}
        row["train_scans"] = _spread([len(r["train_scans"]) for r in rs])[0]
        out.append(row)
    return out


def summarise(
    planned: FinetunePlan, runs: list[dict[str, Any]], options: FinetuneOptions
) -> FinetuneResult:
    """The splits, the runs, and per fraction and network the mean and sd across seeds."""
    splits = [
        {
            **split.to_dict(options.fractions),
            "classes": [
                {"key": c.key, "dataset": c.dataset, "value": c.value, "name": c.name}
                for c in classes
            ],
        }
        for split, classes in planned.splits
    ]
    return FinetuneResult(
        {
            "evaluation": "finetune",
            "headline": HEADLINE_IS,
            "fractions": list(options.fractions),
            "split_seeds": list(options.split_seeds),
            "split": splits[0],  # the first seed's; every seed's is in ``splits``
            "splits": splits,
            "classes": splits[0]["classes"],
            "classes_from": "the training scans of each split (all fractions)",
            "options": asdict(options),
            "optim": options.recipe(),
            "crop": planned.crop,
            "summary": across_seeds(runs),
            "runs": runs,
            "networks": {name: net.describe() for name, net in planned.networks},
        }
    )


def run(
    bank,
    networks: Sequence[LoadedNetwork | tuple[str, LoadedNetwork]],
    options: FinetuneOptions | None = None,
    *,
    scan_ids: list[str] | None = None,
    command: Sequence[str] | None = None,
    on_run: OnRun | None = None,
    save_model: str | None = None,
) -> FinetuneResult:
    """Fine-tune every network on every split and fraction; the result.

    ``networks``: loaded networks (named 'pretrained' or 'scratch') or (name, network)
    pairs; they must share a crop. ``command`` is recorded as the provenance's command.
    """
    options = options or FinetuneOptions()
    planned = plan(bank, networks, options, scan_ids)
    runs = score(planned, options, on_run, save_model)
    result = summarise(planned, runs, options)
    record(result.data, command, bank, [net for _, net in planned.networks])
    return result
