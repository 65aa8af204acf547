"""Label-efficient fine-tuning: the pretrained network vs the same network from scratch.

The question is whether pretraining saves labels, so both networks get exactly the
same budget: the same split, scans, crops, steps, optimiser and schedule; only the
initial weights differ.

* **Split** (``splits.py``): by scan, per dataset, seeded; a fraction of the
  training scans (nested across fractions) trains, the validation scans select the
  weights, the test scans are scored once with the selected weights.
* **Model**: the in-context network with a fixed set of classes. Each class's task
  embedding (tokens per level + fg0) is initialised from the mean embedding of its
  training references (a crop of the network's crop centred on the class's median
  foreground voxel in every training scan holding it), the all-ones global task of
  pretraining rides along, and all of them become parameters. Then every weight
  trains (adaptive Tversky + BCE, AdamW + one-cycle, as pretraining). A class that no
  training scan of a fraction holds keeps an empty-mask embedding and is reported in
  ``untrained_classes``: that is what those labels cost.
* **Crops**: ``crop``^3 from the training scans, half centred near a random labelled
  voxel (nnU-Net's foreground oversampling), random flips. They depend only on
  (seed, fraction, step), so both networks see the same ones. Classes of another
  dataset are masked out of the loss (their labels are unknown there, not absent).
* **Selection**: validation Dice (sliding windows, threshold 0.5) before training and
  every ``val_every`` steps; the best weights (ties: the earlier step) are scored
  on the test scans: Dice, HD95 and NSD per class over the test scans holding it.

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

from train.incontext_net import InContextSegNet, TaskEmbedding
from train.optimizer_setup import one_cycle
from train.run_config import load_config
from train.seg_loss import segmentation_loss

from .checkpoint import LoadedNetwork
from .errors import EvaluationError
from .metrics import SegScores, dice, mean_scores, score
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


@dataclass(frozen=True)
class FinetuneOptions:
    """Budget and protocol, identical for every network of one evaluation."""

    fractions: tuple[float, ...] = (0.1, 0.2, 0.4, 1.0)
    steps: int = 100  # a CPU demo; real comparisons use thousands
    val_every: int = 25
    batch_size: int = 2
    lr: float | None = None  # None: the preset's pretraining lr
    split_seed: int = 0
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
        if self.lr is not None and not self.lr > 0:
            raise EvaluationError(f"--lr must be > 0, got {self.lr}")


class ScanAccess:
    """The labelled scans by id; every read is logged under the phase that made it."""

    def __init__(self, scans: Sequence[LabelledScan]) -> None:
        self._scans = {s.scan_id: s for s in scans}
        self.reads: dict[str, set[str]] = defaultdict(set)

    def get(self, phase: str, scan_id: str) -> LabelledScan:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.reads[phase].add(scan_id)
        return self._scans[scan_id]

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


def _optimizer(model: FixedTaskNet, optim: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    """AdamW as pretraining; no weight decay on norms, biases or the task embeddings."""
    task_params = {id(p) for p in [*model.tokens.values(), model.fg0]}
    decay = [p for p in model.parameters() if p.ndim > 1 and id(p) not in task_params]
    rest = [p for p in model.parameters() if p.ndim <= 1 or id(p) in task_params]
    groups = [
        {"params": decay, "weight_decay": float(optim["weight_decay"])},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim["betas"]))


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
    """Mean Dice over (validation scan, class it holds): the only selection signal."""
    model.eval()
    values = []
    for sid in val_ids:
        scan = access.get("validation", sid)
        probs = _probabilities(model, scan, crop, options)
        values += [
            dice(probs[i] >= 0.5, scan.mask(c.value)) for i, c in _scored_classes(classes, scan)
        ]
    model.train()
    return float(np.mean(values)) if values else float("nan")


def test_scores(
    model: FixedTaskNet,
    classes: Sequence[StructureClass],
    test_ids: Sequence[str],
    access: ScanAccess,
    crop: int,
    options: FinetuneOptions,
) -> dict[str, Any]:
    """Dice, HD95 and NSD per class (mean over the test scans holding it) and their mean."""
    model.eval()
    per: dict[str, list[SegScores]] = defaultdict(list)
    for sid in test_ids:
        scan = access.get("test", sid)
        probs = _probabilities(model, scan, crop, options)
        for i, c in _scored_classes(classes, scan):
            per[c.key].append(
                score(probs[i] >= 0.5, scan.mask(c.value), scan.spacing, options.tolerance_mm)
            )
    by_class = {key: {**mean_scores(v), "scans": len(v)} for key, v in sorted(per.items())}
    mean = {m: float(np.mean([c[m] for c in by_class.values()])) for m in ("dice", "hd95", "nsd")}
    return {
        "mean_dice": mean["dice"],
        "mean_hd95": mean["hd95"],
        "mean_nsd": mean["nsd"],
        "classes": by_class,
    }


def finetune_once(
    net: LoadedNetwork,
    name: str,
    classes: Sequence[StructureClass],
    split: Split,
    fraction: float,
    access: ScanAccess,
    crop: int,
    optim: dict[str, Any],
    options: FinetuneOptions,
) -> dict[str, Any]:
    """Fine-tune a copy of ``net`` on ``fraction`` of the training scans; one run record."""
    t0 = time.perf_counter()
    device = torch.device(options.device)
    torch.manual_seed(options.seed)
    train_ids = split.fraction(fraction)
    base = copy.deepcopy(net.model).to(device).eval()
    tasks, missing = initial_tasks(base, classes, train_ids, access, crop, device)
    model = FixedTaskNet(base, tasks).to(device).train()
    lr = float(options.lr if options.lr is not None else optim["lr"])
    optimizer = _optimizer(model, optim, lr)
    warmup = float(optim["warmup_frac"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: one_cycle(step, options.steps, warmup)
    )
    clip = float(optim.get("grad_clip") or 0)
    sampler = CropSampler(
        classes,
        train_ids,
        access,
        crop,
        options.fg_share,
        seed=options.seed * 1_000_003 + round(fraction * 1e6),
    )
    use_bf16 = device.type == "cuda"
    val_ids = split.validation_ids
    curve = [
        {"step": 0, "val_dice": validation_dice(model, classes, val_ids, access, crop, options)}
    ]
    best_step, best_val = 0, curve[0]["val_dice"]
    best_state = copy.deepcopy(model.state_dict())
    losses: list[float] = []
    bar = None
    if options.progress:
        from tqdm import tqdm

        bar = tqdm(total=options.steps, desc=f"finetune {name} {fraction:g}", dynamic_ncols=True)
    for step in range(1, options.steps + 1):
        batch = {k: v.to(device) for k, v in sampler.batch(step, options.batch_size).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(batch["image"])[:, : len(classes)]
        loss, _ = segmentation_loss(logits, batch["target"], batch["valid"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
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
                best_state = copy.deepcopy(model.state_dict())
    if bar is not None:
        bar.close()
    model.load_state_dict(best_state)
    test = test_scores(model, classes, split.test_ids, access, crop, options)
    return {
        "network": name,
        "label": net.label,
        "fraction": fraction,
        "train_scans": train_ids,
        "untrained_classes": missing,
        "steps": options.steps,
        "lr": lr,
        "best_step": best_step,
        "val_dice": best_val,
        "val_curve": curve,
        "final_loss": losses[-1],
        "test": test,
        "seconds": time.perf_counter() - t0,
    }


def _preset_optim(preset: str) -> dict[str, Any]:
    try:
        return dict(load_config(preset)["optim"])
    except FileNotFoundError:
        return dict(load_config(None)["optim"])


def evaluate_finetune(
    bank,
    networks: Sequence[tuple[str, LoadedNetwork]],
    options: FinetuneOptions,
    scan_ids: list[str] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every (fraction, network) run on one split; the results every output is made from.

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
    first = networks[0][1]
    optim = dict(first.config.get("optim") or _preset_optim(first.preset))
    scans = labelled_scans(bank, scan_ids)
    access = ScanAccess(scans)
    split = make_split({s.scan_id: s.dataset for s in scans}, options.split_seed)
    # The class set comes from the training scans only: validation/test labels stay unseen.
    train_ids = set(split.train_ids)
    classes, _ = find_classes([s for s in scans if s.scan_id in train_ids], min_scans=1)
    if not classes:
        raise EvaluationError(
            f"no training scan of bank {bank.location} (split seed {options.split_seed}) holds "
            "a labelled structure; label more scans or try another --split-seed"
        )
    # A precondition on label values only (outside the read log): without a class in the
    # validation and the test scans there is nothing to select on or to score.
    for part, ids in (("validation", split.validation_ids), ("test", split.test_ids)):
        if not any(_scored_classes(classes, s) for s in scans if s.scan_id in set(ids)):
            raise EvaluationError(
                f"the split of seed {options.split_seed} leaves no {part} scan of bank "
                f"{bank.location} holding a class of the training scans; label more scans "
                "or try another --split-seed"
            )
    runs = []
    for fraction in options.fractions:
        for name, net in networks:
            access.reads.clear()
            run = finetune_once(net, name, classes, split, fraction, access, crop, optim, options)
            run["reads"] = access.snapshot()
            runs.append(run)
            if on_run is not None:
                on_run(run)
    return {
        "evaluation": "finetune",
        "fractions": list(options.fractions),
        "split": split.to_dict(options.fractions),
        "classes": [
            {"key": c.key, "dataset": c.dataset, "value": c.value, "name": c.name} for c in classes
        ],
        "classes_from": "the training scans of the split (all fractions)",
        "options": asdict(options),
        "optim": {
            k: optim[k] for k in ("name", "betas", "weight_decay", "warmup_frac") if k in optim
        },
        "crop": crop,
        "runs": runs,
    }
