"""The fine-tuned network and how it is scored.

The in-context network keeps its form with a fixed set of classes: each class's task
embedding (tokens per level + fg0) starts as the mean embedding of its training
references (a crop of the network's crop centred on the class's median foreground voxel
in every training scan holding it), the all-ones global task of pretraining rides
along, and all of them become parameters (``FixedTaskNet``). A class no training scan
holds keeps an empty-mask embedding and is reported as untrained.

Validation and test segment whole scans by sliding windows (threshold 0.5) and score
each (class, scan holding it); the headline is ``aggregate.headline``: per class the
mean over its scans, per dataset over its classes, then over datasets.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from maskbank.train.incontext_net import InContextSegNet, TaskEmbedding

from .aggregate import headline
from .finetune_data import ScanAccess
from .metrics import dice, score
from .sliding import sliding_probabilities, task_groups
from .structures import LabelledScan, StructureClass, centred_crop, median_foreground

if TYPE_CHECKING:
    from .finetune import FinetuneOptions

METRICS = ("dice", "hd95", "asd", "nsd")
HEADLINE_IS = "mean over datasets of the mean over classes of the mean over test scans"


class FixedTaskNet(nn.Module):
    """The in-context network with its task embeddings (K classes + global) as parameters."""

    def __init__(self, net: InContextSegNet, tasks: TaskEmbedding) -> None:
        super().__init__()
        self.net = net
        self.tokens = nn.ParameterDict(
            {str(lv): nn.Parameter(t.detach().clone()) for lv, t in tasks.tokens.items()}
        )
        self.fg0 = nn.Parameter(tasks.fg0.detach().clone())
        # The propagation readout's memory (reference keys and mask occupancy) stays fixed.
        self.mem_keys: torch.Tensor | None
        self.mem_masks: torch.Tensor | None
        for name in ("mem_keys", "mem_masks"):
            t = getattr(tasks, name)
            self.register_buffer(name, None if t is None else t.detach().clone())

    def tasks(self) -> TaskEmbedding:
        tokens = {int(lv): t for lv, t in self.tokens.items()}
        return TaskEmbedding(tokens, self.fg0, self.mem_keys, self.mem_masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K + 1, *S); the last task is the global one."""
        return self.net.segment(x, self.tasks())


def _mean_embedding(parts: list[TaskEmbedding]) -> TaskEmbedding:
    """Tokens averaged over the shots; the readout memory joins their positions."""
    return TaskEmbedding.cat_batch(parts).mean()


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


def scored_classes(
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
            for i, c in scored_classes(classes, scan)
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
        for i, c in scored_classes(classes, scan):
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
