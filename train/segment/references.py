"""Task embeddings from labelled references, the way the in-context evaluation makes them.

Per (reference, class): the network's crop centred on the class
(``structures.median_foreground``), with two masks, the class and the all-ones global
task. A class's embedding is the mean over the references that hold it; the global task
is the mean over every (reference, class) crop, so it is the same for every query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maskbank.train.evaluation.structures import median_foreground
from maskbank.train.evaluation.zoom import FIT, OFF, finer_step, reference_crop, reference_scale
from maskbank.train.incontext_net import InContextSegNet, TaskEmbedding

from .tasks import TaskSet


@dataclass
class Reference:
    """One prepared reference: normalised image and label map on the same (network) grid."""

    ref_id: str
    image: np.ndarray  # float32, normalised as at pretraining
    label: np.ndarray  # integer label map (a binary mask is values {0, 1})
    source_sha256: str | None = None


@torch.no_grad()
def encode_references(
    model: InContextSegNet,
    crop: int,
    references: list[Reference],
    values: list[int],
    names: list[str],
    device: torch.device | str = "cpu",
    network_sha256: str | None = None,
    reference_zoom: str = FIT,
    max_zoom: float = 4.0,
    **meta,
) -> TaskSet:
    """The task set of ``values`` (one class each) from ``references``.

    Raises ``ValueError`` naming a value that no reference holds. ``meta`` is passed to
    `TaskSet` (network_sha256, spacing, modality).
    """
    device = torch.device(device)
    model = model.to(device).eval()
    for value in values:
        if not any((ref.label == value).any() for ref in references):
            held = sorted({int(v) for r in references for v in np.unique(r.label) if v})
            raise ValueError(
                f"label value {value} is in none of the reference masks (after resampling to "
                f"the network's grid); they hold {held or 'nothing'}"
            )
    scales = [
        max(
            reference_scale(ref.label == value, crop, reference_zoom, max_zoom)
            for ref in references
            if (ref.label == value).any()
        )
        for value in values
    ]
    classes, global_task, used = _encode_at(model, crop, references, values, 1.0, device)
    needed = {s for s in scales if s != 1} | {finer_step(s) for s in scales if s != 1}
    zoomed = {}
    for scale in sorted(needed - {1.0}):
        c, g, _ = _encode_at(model, crop, references, values, scale, device)
        zoomed[scale] = (c, g)
    refs = [{"id": r.ref_id, "source_sha256": r.source_sha256} for r in references]
    off = reference_zoom == OFF
    return TaskSet(
        classes,
        global_task,
        [int(v) for v in values],
        list(names),
        network_sha256,
        references=[*refs, *[{"shot": u} for u in used]],
        scales=None if off else scales,
        zoomed=zoomed,
        zoom=None if off else {"reference_zoom": reference_zoom, "max_zoom": float(max_zoom)},
        **meta,
    )


def _encode_at(
    model: InContextSegNet,
    crop: int,
    references: list[Reference],
    values: list[int],
    scale: float,
    device: torch.device,
) -> tuple[TaskEmbedding, TaskEmbedding, list[dict]]:
    """(classes, global task, shots used) with every reference crop taken at ``scale``."""
    per_class, globals_ = [], []
    used: list[dict] = []
    for value in values:
        shots = []
        for ref in references:
            mask = ref.label == value
            if not mask.any():
                continue
            centre = median_foreground(mask)
            image, crop_mask = reference_crop(ref.image, mask, centre, crop, scale)
            masks = np.stack([crop_mask, np.ones((crop,) * 3, np.float32)])
            img_t = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
            mask_t = torch.from_numpy(masks)[None].float()
            shots.append(model.encode_tasks(img_t.to(device), mask_t.to(device)))
            used.append({"value": int(value), "reference": ref.ref_id, "voxels": int(mask.sum())})
        batch = TaskEmbedding.cat_batch(shots)
        per_class.append(batch.select([0]).mean())
        globals_.append(batch.select([1]))
    classes = TaskEmbedding.cat(per_class).to("cpu")
    global_task = TaskEmbedding.cat_batch(globals_).mean().to("cpu")
    return classes, global_task, used
