"""Label-efficient fine-tuning: the pretrained network vs the same network from scratch.

The question is whether pretraining saves labels, so both networks get exactly the
same budget: the same splits, scans, crops, steps, optimiser, schedule and learning
rate grid; only the initial weights differ.

* **Splits** (``splits.py``): per dataset, seeded; a fraction of the training scans
  (nested across fractions) trains, the validation scans select the weights and the
  learning rate, the test scans are scored once with the selected weights. Several
  ``split_seeds`` repeat everything on independent splits; results report the mean
  and the standard deviation across them (the spread a single split hides).
* **Model**: the in-context network with a fixed set of classes. Each class's task
  embedding (tokens per level + fg0) is initialised from the mean embedding of its
  training references (a crop of the network's crop centred on the class's median
  foreground voxel in every training scan holding it), the all-ones global task of
  pretraining rides along, and all of them become parameters. Then every weight
  trains (adaptive Tversky + BCE). A class that no training scan of a fraction holds
  keeps an empty-mask embedding and is reported in ``untrained_classes``: that is
  what those labels cost.
* **Recipe of its own**, not the pretraining one: AdamW (betas, weight decay and
  one-cycle warm-up of ``FinetuneOptions``) at each learning rate of ``lr_grid``.
  The best rate depends on the initial weights (pretrained weights usually want a
  smaller one than random ones), so each network picks its own from the same grid
  by validation Dice; every rate's validation score is recorded.
* **Crops**: ``crop``^3 from the training scans, half centred near a random labelled
  voxel (nnU-Net's foreground oversampling), random flips. They depend only on
  (seed, split seed, fraction, step), so every network and rate sees the same ones.
  Classes of another dataset are masked out of the loss (their labels are unknown
  there, not absent).
* **Selection**: validation Dice (sliding windows, threshold 0.5) before training and
  every ``val_every`` steps; the best (rate, step) (ties: the smaller rate, then the
  earlier step) is scored on the test scans: Dice, HD95, ASD and NSD per (class,
  test scan holding it).
* **Headline** (``aggregate.headline``, as the in-context evaluation and published
  tables): per class the mean over its test scans, per dataset the mean over its
  classes, then the mean over datasets; the micro mean over (class, scan) pairs is
  reported beside it. Validation selects on the same statistic.

Each run records which scans every phase read (``reads``), so a test can prove that
test scans never reach training or selection.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from maskbank.train.incontext_net import InContextSegNet, TaskEmbedding
from maskbank.train.optimizer_setup import one_cycle
from maskbank.train.seg_loss import segmentation_loss

from .aggregate import headline
from .checkpoint import LoadedNetwork
from .errors import EvaluationError
from .metrics import dice, score
from .sliding import sliding_probabilities, task_groups
from .splits import Split, check_fraction, make_split
from .structures import (
    LabelledScan,
    StructureClass,
    centred_crop,
    find_classes,
    labelled_scans,
    median_foreground,
)

PHASES = ("init", "train", "validation", "test")
MAX_FG_VOXELS = 20_000  # foreground voxels kept per (scan, class) to draw crop centres from
LR_GRID = (3e-4, 1e-3, 3e-3)
OPTIMIZER = "adamw"
METRICS = ("dice", "hd95", "asd", "nsd")
HEADLINE_IS = "mean over datasets of the mean over classes of the mean over test scans"


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


class ScanAccess:
    """The labelled scans by id; every read is logged under the phase that made it.

    ``counts`` tells how often each phase read (a test scan read once per test scan
    means the test was scored once, not once per learning rate).
    """

    def __init__(self, scans: Sequence[LabelledScan]) -> None:
        self._scans = {s.scan_id: s for s in scans}
        self.reads: dict[str, set[str]] = defaultdict(set)
        self.counts: dict[str, int] = defaultdict(int)

    def get(self, phase: str, scan_id: str) -> LabelledScan:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.reads[phase].add(scan_id)
        self.counts[phase] += 1
        return self._scans[scan_id]

    def clear(self) -> None:
        self.reads.clear()
        self.counts.clear()

    def dataset(self, scan_id: str) -> str:
        return self._scans[scan_id].dataset  # an attribute, not the scan's voxels

    def snapshot(self) -> dict[str, list[str]]:
        return {p: sorted(self.reads.get(p, ())) for p in PHASES}


class FixedTaskNet(nn.Module):
    """The in-context network with its task embeddings (K classes + global) as parameters."""

    def __init__(self, net: InContextSegNet, tasks: TaskEmbedding) -> None:
        super().__init__()
        self.net = net
        self.tokens = nn.ParameterDict(
            {str(lv): nn.Parameter(t.detach().clone()) for lv, t in tasks.tokens.items()}
        )
        self.fg0 = nn.Parameter(tasks.fg0.detach().clone())

    def tasks(self) -> TaskEmbedding:
        return TaskEmbedding({int(lv): t for lv, t in self.tokens.items()}, self.fg0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K + 1, *S); the last task is the global one."""
        return self.net.segment(x, self.tasks())


def _mean_embedding(parts: list[TaskEmbedding]) -> TaskEmbedding:
    return TaskEmbedding(
        {
            lv: torch.cat([p.tokens[lv] for p in parts]).mean(0, keepdim=True)
            for lv in parts[0].tokens
        },
        torch.cat([p.fg0 for p in parts]).mean(0, keepdim=True),
    )


@torch.no_grad()
def initial_tasks(
    model: InContextSegNet,
    classes: Sequence[StructureClass],
    train_ids: Sequence[str],
    access: ScanAccess,
    crop: int,
    device: torch.device,
) -> tuple[TaskEmbedding, list[str]]:
    """Mean reference embedding per class over the training scans holding it, + global.

    Returns the embedding (1, K + 1) and the keys of classes no training scan holds.
    """
    per_class, globals_, missing = [], [], []
    ones = np.ones((crop,) * 3, dtype=bool)
    for cls in classes:
        shots = []
        for sid in train_ids:
            if access.dataset(sid) != cls.dataset:
                continue
            scan = access.get("init", sid)
            if scan.counts.get(cls.value, 0) == 0:
                continue
            mask = scan.mask(cls.value)
            centre = median_foreground(mask)
            image = centred_crop(scan.image, centre, crop, float(scan.image.min()))
            masks = np.stack([centred_crop(mask, centre, crop, False), ones])
            emb = model.encode_tasks(
                torch.from_numpy(image)[None, None].to(device),
                torch.from_numpy(masks)[None].float().to(device),
            )
            shots.append(emb)
        if not shots:  # an empty mask: the pooled tokens are zero, the query tokens still learn
            missing.append(cls.key)
            image = np.zeros((1, 1, crop, crop, crop), np.float32)
            masks = np.stack([np.zeros_like(ones), ones])[None].astype(np.float32)
            shots.append(
                model.encode_tasks(
                    torch.from_numpy(image).to(device), torch.from_numpy(masks).to(device)
                )
            )
        mean = _mean_embedding(shots)
        per_class.append(mean.select([0]))
        globals_.append(mean.select([1]))
    return TaskEmbedding.cat([*per_class, _mean_embedding(globals_)]), missing


class CropSampler:
    """Training crops that depend only on (seed, fraction, step): the same for every network."""

    def __init__(
        self,
        classes: Sequence[StructureClass],
        train_ids: Sequence[str],
        access: ScanAccess,
        crop: int,
        fg_share: float,
        seed: int,
    ) -> None:
        self.classes = list(classes)
        self.train_ids = list(train_ids)
        self.access = access
        self.crop = crop
        self.fg_share = fg_share
        self.seed = seed
        self._fg: dict[tuple[str, int], np.ndarray] = {}

    def _foreground(self, scan: LabelledScan, value: int) -> np.ndarray:
        """Up to MAX_FG_VOXELS labelled voxels (a fixed subsample: memory stays bounded)."""
        key = (scan.scan_id, value)
        if key not in self._fg:
            idx = np.argwhere(scan.label == value)
            if len(idx) > MAX_FG_VOXELS:
                pick = np.random.default_rng(zlib.crc32(f"{key}".encode())).choice(
                    len(idx), MAX_FG_VOXELS, replace=False
                )
                idx = idx[pick]
            self._fg[key] = idx
        return self._fg[key]

    def batch(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """image (B,1,S,S,S), target (B,K,S,S,S) float, valid (B,K) bool."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, step])
        s, k = self.crop, len(self.classes)
        images = np.empty((batch_size, 1, s, s, s), np.float32)
        targets = np.zeros((batch_size, k, s, s, s), np.float32)
        valid = np.zeros((batch_size, k), bool)
        for b in range(batch_size):
            scan = self.access.get("train", self.train_ids[rng.integers(len(self.train_ids))])
            mine = [i for i, c in enumerate(self.classes) if c.dataset == scan.dataset]
            present = [i for i in mine if scan.counts.get(self.classes[i].value, 0)]
            shape = np.array(scan.image.shape)
            if present and rng.random() < self.fg_share:
                cls = self.classes[present[rng.integers(len(present))]]
                fg = self._foreground(scan, cls.value)
                jitter = rng.integers(-(s // 4), s // 4 + 1, size=3)
                centre = np.clip(fg[rng.integers(len(fg))] + jitter, 0, shape - 1)
            else:
                centre = rng.integers(0, shape)
            centre_t = tuple(int(c) for c in centre)
            image = centred_crop(scan.image, centre_t, s, float(scan.image.min()))
            label = centred_crop(scan.label, centre_t, s, 0)
            flips = tuple(a for a in range(3) if rng.random() < 0.5)
            if flips:
                image, label = np.flip(image, flips), np.flip(label, flips)
            images[b, 0] = image
            for i in mine:
                targets[b, i] = label == self.classes[i].value
                valid[b, i] = True
        return {
            "image": torch.from_numpy(images),
            "target": torch.from_numpy(targets),
            "valid": torch.from_numpy(valid),
        }


def _optimizer(model: FixedTaskNet, options: FinetuneOptions, lr: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases or the task embeddings."""
    task_params = {id(p) for p in [*model.tokens.values(), model.fg0]}
    decay = [p for p in model.parameters() if p.ndim > 1 and id(p) not in task_params]
    rest = [p for p in model.parameters() if p.ndim <= 1 or id(p) in task_params]
    groups = [
        {"params": decay, "weight_decay": float(options.weight_decay)},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(options.betas))


@torch.no_grad()
def _probabilities(
    model: FixedTaskNet, scan: LabelledScan, crop: int, options: FinetuneOptions
) -> np.ndarray:
    """(K, *scan) class probabilities; every window runs all K + 1 tasks, as in training."""
    k = model.fg0.shape[1] - 1
    device = torch.device(options.device)

    def predict(x: torch.Tensor, ids: list[int]) -> torch.Tensor:
        return model(x)[:, ids]

    probs, _ = sliding_probabilities(
        predict,
        scan.image,
        task_groups(k, scan.image.size, k),
        crop,
        overlap=options.overlap,
        window_batch=options.window_batch,
        device=device,
    )
    return probs


def _scored_classes(
    classes: Sequence[StructureClass], scan: LabelledScan
) -> list[tuple[int, StructureClass]]:
    """Classes of the scan's dataset that it holds (absent ones are not scored)."""
    return [
        (i, c)
        for i, c in enumerate(classes)
        if c.dataset == scan.dataset and scan.counts.get(c.value, 0)
    ]


def validation_dice(
    model: FixedTaskNet,
    classes: Sequence[StructureClass],
    val_ids: Sequence[str],
    access: ScanAccess,
    crop: int,
    options: FinetuneOptions,
) -> float:
    """The headline Dice over (validation scan, class it holds): the only selection signal."""
    model.eval()
    rows = []
    for sid in val_ids:
        scan = access.get("validation", sid)
        probs = _probabilities(model, scan, crop, options)
        rows += [
            {
                "dataset": c.dataset,
                "class": c.name,
                "dice": dice(probs[i] >= 0.5, scan.mask(c.value)),
            }
            for i, c in _scored_classes(classes, scan)
        ]
    model.train()
    head = headline(rows)
    return head["mean"] if head else float("nan")


def test_scores(
    model: FixedTaskNet,
    classes: Sequence[StructureClass],
    test_ids: Sequence[str],
    access: ScanAccess,
    crop: int,
    options: FinetuneOptions,
) -> dict[str, Any]:
    """Per (class, test scan holding it) scores, per class and dataset means, the headline."""
    model.eval()
    rows = []
    for sid in test_ids:
        scan = access.get("test", sid)
        probs = _probabilities(model, scan, crop, options)
        for i, c in _scored_classes(classes, scan):
            sc = score(probs[i] >= 0.5, scan.mask(c.value), scan.spacing, options.tolerance_mm)
            rows.append({"dataset": c.dataset, "class": c.name, "scan": sid, **sc.to_dict()})
    heads = {m: headline(rows, m) for m in METRICS}
    dice_head = heads["dice"]
    assert dice_head is not None  # the split's precondition: a test scan holds a class
    per_class: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        per_class[f"{r['dataset']}/{r['class']}"].append(r)
    return {
        "headline": HEADLINE_IS,
        **{f"mean_{m}": heads[m]["mean"] for m in METRICS},  # type: ignore[index]
        "micro_dice": dice_head["micro"],
        "datasets": {
            d: {m: heads[m]["datasets"][d] for m in METRICS}  # type: ignore[index]
            for d in dice_head["datasets"]
        },
        "classes": {
            key: {**{m: float(np.mean([r[m] for r in v])) for m in METRICS}, "scans": len(v)}
            for key, v in sorted(per_class.items())
        },
        "cases": rows,
    }


@dataclass
class Candidate:
    """One learning rate's training: its validation curve and best weights."""

    lr: float
    curve: list[dict[str, Any]]
    best_step: int
    best_val: float
    final_loss: float
    seconds: float
    state: dict[str, torch.Tensor] | None  # best weights; dropped once another rate wins

    def record(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "val_dice": self.best_val,
            "best_step": self.best_step,
            "final_loss": self.final_loss,
            "val_curve": self.curve,
            "seconds": self.seconds,
        }


def _host_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights copied to the CPU: the best so far are held beside the training model."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train_one_rate(
    start: FixedTaskNet,
    val0: float,
    lr: float,
    classes: Sequence[StructureClass],
    val_ids: Sequence[str],
    sampler: CropSampler,
    access: ScanAccess,
    crop: int,
    options: FinetuneOptions,
    label: str,
) -> Candidate:
    """Train a copy of ``start`` at peak rate ``lr``; keep the weights of the best validation.

    ``val0`` is the validation Dice of ``start`` (the same for every rate, so computed once).
    """
    t0 = time.perf_counter()
    device = torch.device(options.device)
    torch.manual_seed(options.seed)
    model = copy.deepcopy(start).train()
    optimizer = _optimizer(model, options, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: one_cycle(step, options.steps, options.warmup_frac)
    )
    use_bf16 = device.type == "cuda"
    curve: list[dict[str, Any]] = [{"step": 0, "val_dice": val0}]
    best_step, best_val = 0, val0
    best_state = _host_copy(model)
    losses: list[float] = []
    bar = None
    if options.progress:
        from tqdm import tqdm

        bar = tqdm(total=options.steps, desc=f"finetune {label} lr {lr:g}", dynamic_ncols=True)
    for step in range(1, options.steps + 1):
        batch = {k: v.to(device) for k, v in sampler.batch(step, options.batch_size).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(batch["image"])[:, : len(classes)]
        loss, _ = segmentation_loss(logits, batch["target"], batch["valid"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if options.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", best=f"{best_val:.3f}")
        if step % options.val_every == 0 or step == options.steps:
            val = validation_dice(model, classes, val_ids, access, crop, options)
            curve.append({"step": step, "val_dice": val, "loss": losses[-1]})
            if val > best_val or not np.isfinite(best_val):
                best_step, best_val = step, val
                best_state = _host_copy(model)
    if bar is not None:
        bar.close()
    return Candidate(
        lr, curve, best_step, best_val, losses[-1], time.perf_counter() - t0, best_state
    )


def finetune_once(
    net: LoadedNetwork,
    name: str,
    classes: Sequence[StructureClass],
    split: Split,
    fraction: float,
    access: ScanAccess,
    crop: int,
    options: FinetuneOptions,
    on_model: Callable[[FixedTaskNet], Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``net`` on ``fraction`` of the training scans at every rate of the grid.

    The (rate, step) with the best validation Dice is scored on the test scans, once;
    ``on_model`` gets that selected network (e.g. to save it for ``maskbank segment``).
    """
    t0 = time.perf_counter()
    device = torch.device(options.device)
    train_ids = split.fraction(fraction)
    base = copy.deepcopy(net.model).to(device).eval()
    tasks, missing = initial_tasks(base, classes, train_ids, access, crop, device)
    start = FixedTaskNet(base, tasks).to(device)
    val_ids = split.validation_ids
    val0 = validation_dice(start, classes, val_ids, access, crop, options)
    sampler_seed = (options.seed * 1_000_003 + split.seed * 7_919 + round(fraction * 1e6)) & (
        0xFFFFFFFF
    )
    sampler = CropSampler(classes, train_ids, access, crop, options.fg_share, sampler_seed)
    search: list[Candidate] = []
    best: Candidate | None = None
    for lr in options.lr_grid:  # ascending: a tie keeps the smaller rate
        cand = train_one_rate(
            start,
            val0,
            lr,
            classes,
            val_ids,
            sampler,
            access,
            crop,
            options,
            f"{name} {fraction:g}",
        )
        search.append(cand)
        if best is None or cand.best_val > best.best_val or not np.isfinite(best.best_val):
            if best is not None:
                best.state = None
            best = cand
        else:
            cand.state = None
    assert best is not None and best.state is not None
    model = copy.deepcopy(start)
    model.load_state_dict(best.state)
    if on_model is not None:
        on_model(model)
    test = test_scores(model, classes, split.test_ids, access, crop, options)
    return {
        "network": name,
        "label": net.label,
        "split_seed": split.seed,
        "fraction": fraction,
        "train_scans": train_ids,
        "untrained_classes": missing,
        "steps": options.steps,
        "optimizer": OPTIMIZER,
        "lr": best.lr,
        "lr_grid": list(options.lr_grid),
        "lr_search": [c.record() for c in search],
        "best_step": best.best_step,
        "val_dice": best.best_val,
        "val_curve": best.curve,
        "final_loss": best.final_loss,
        "test": test,
        "seconds": time.perf_counter() - t0,
    }


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
        if not any(_scored_classes(classes, s) for s in scans if s.scan_id in set(ids)):
            raise EvaluationError(
                f"the split of seed {split.seed} leaves no {part} scan of bank "
                f"{bank.location} holding a class of the training scans; label more scans "
                "or try other --split-seeds"
            )
    return classes


def evaluate_finetune(
    bank,
    networks: Sequence[tuple[str, LoadedNetwork]],
    options: FinetuneOptions,
    scan_ids: list[str] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    save_model: str | None = None,
) -> dict[str, Any]:
    """Every (split seed, fraction, network) run; the results every output is made from.

    ``save_model``: a folder for the first network's selected weights and class embeddings
    at the first split seed's largest fraction (``train.segment.saved_model``).

    ``networks`` are (name, network) pairs, e.g. ("pretrained", ...), ("scratch", ...);
    they must share a crop (the same data for every network).
    """
    crops = {net.crop for _, net in networks}
    if len(crops) != 1:
        raise EvaluationError(
            f"the networks train on different crops {sorted(crops)}; compare networks of "
            "one preset (the scratch baseline takes the checkpoint's)"
        )
    crop = crops.pop()
    scans = labelled_scans(bank, scan_ids)
    access = ScanAccess(scans)
    datasets = {s.scan_id: s.dataset for s in scans}
    # A subject's scans (follow-ups, other sequences) stay in one part of every split.
    subjects = {s.scan_id: s.subject for s in scans if s.subject != s.scan_id}
    plans = []
    for seed in options.split_seeds:  # every split checked before any training
        split = make_split(datasets, seed, subjects)
        plans.append((split, _check_split(split, scans, bank)))
    runs, splits = [], []
    for split, classes in plans:
        splits.append(
            {
                **split.to_dict(options.fractions),
                "classes": [
                    {"key": c.key, "dataset": c.dataset, "value": c.value, "name": c.name}
                    for c in classes
                ],
            }
        )
        for fraction in options.fractions:
            for name, net in networks:
                access.clear()
                saver = None
                first = split is plans[0][0] and name == networks[0][0]
                if save_model and first and fraction == max(options.fractions):
                    from maskbank.train.segment.saved_model import finetuned_saver

                    saver = finetuned_saver(save_model, list(classes), net.preset, crop, scans)
                run = finetune_once(
                    net, name, classes, split, fraction, access, crop, options, saver
                )
                run["reads"] = access.snapshot()
                run["read_counts"] = {p: access.counts.get(p, 0) for p in PHASES}
                runs.append(run)
                if on_run is not None:
                    on_run(run)
    return {
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
        "crop": crop,
        "summary": across_seeds(runs),
        "runs": runs,
    }
