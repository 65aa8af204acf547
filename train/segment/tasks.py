"""Task sets: the embeddings a network segments with, saved in a file that runs no code.

A task set holds one embedding per class (label value) plus the all-ones "global" task
that rode along with every pass in pretraining, and what they mean: label values and
names, the spacing and modality of the references, the references' ids, and the sha256
of the network that computed them. Embeddings only mean something to the network that
made them, so a task file is refused for any other network.

With a reference zoom (``train.evaluation.zoom``) a class is segmented at the scale its
references ask for: the set then also holds every class and the global task encoded at
each other scale a run may need (a zoomed class's scale and the finer step it is refined
at), because the evaluation encodes the global task at the scale of the pass.

A set made from references under a reference-calibrated threshold also keeps each class's
threshold (``thresholds``) and the rule that picked them (``threshold_rule``, what a run
from the file records): the file holds no reference masks to calibrate on again, and a
run from it should cut where a run from the references would.

The file is safetensors: tensors plus a string header, read without unpickling.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from maskbank.train.incontext_net import TaskEmbedding

FORMAT = "maskbank-task"
VERSION = 3  # 2: per-class scales and their embeddings; 3: per-class thresholds (each
# written only when the set has them, so that older readers still read the rest)
_META_KEY = "maskbank"


class TaskFileError(ValueError):
    """A task file that cannot be used (unreadable, of another format, another network)."""


@dataclass
class TaskSet:
    """Embeddings of K classes (batch 1) + the global task, and what they stand for.

    ``together``: every pass runs all K classes (a fine-tuned network was trained so);
    otherwise classes run in groups of at most the K the network was pretrained with.
    ``scales``: the scale each class is segmented at (None: all 1); ``zoomed``: per scale
    other than 1, (every class, global task) encoded there; ``zoom``: the reference zoom
    and max zoom the scales were chosen with (None: made without one). ``thresholds``:
    each class's threshold as its references calibrated it (None: not calibrated), and
    ``threshold_rule`` the rule that picked them, as results record it (None: unknown).
    """

    classes: TaskEmbedding
    global_task: TaskEmbedding | None
    values: list[int]
    names: list[str]
    network_sha256: str | None
    spacing: tuple[float, float, float] | None = None
    modality: str | None = None
    references: list[dict[str, Any]] = field(default_factory=list)
    together: bool = False
    scales: list[float] | None = None
    zoomed: dict[float, tuple[TaskEmbedding, TaskEmbedding | None]] = field(default_factory=dict)
    zoom: dict[str, Any] | None = None
    thresholds: list[float] | None = None
    threshold_rule: str | None = None

    def __post_init__(self) -> None:
        if len(self.values) != self.classes.n_tasks or len(self.names) != len(self.values):
            raise ValueError(
                f"{self.classes.n_tasks} class embeddings for {len(self.values)} values and "
                f"{len(self.names)} names"
            )
        if self.scales is not None and len(self.scales) != len(self.values):
            raise ValueError(f"{len(self.scales)} scales for {len(self.values)} values")
        if self.thresholds is not None and len(self.thresholds) != len(self.values):
            raise ValueError(f"{len(self.thresholds)} thresholds for {len(self.values)} values")

    @property
    def class_scales(self) -> list[float]:
        return list(self.scales) if self.scales is not None else [1.0] * self.n_tasks

    def at(self, scale: float) -> tuple[TaskEmbedding, TaskEmbedding | None]:
        """(every class, global task) encoded at ``scale``."""
        if scale == 1:
            return self.classes, self.global_task
        if scale not in self.zoomed:
            raise ValueError(f"the task set holds no embeddings at scale {scale}")
        return self.zoomed[scale]

    def select(self, idx: list[int]) -> TaskSet:
        """The classes at positions ``idx`` (the global tasks are kept)."""
        scales = self.class_scales
        return replace(
            self,
            classes=self.classes.select(idx),
            values=[self.values[i] for i in idx],
            names=[self.names[i] for i in idx],
            scales=[scales[i] for i in idx] if self.scales is not None else None,
            zoomed={s: (c.select(idx), g) for s, (c, g) in self.zoomed.items()},
            thresholds=[self.thresholds[i] for i in idx] if self.thresholds else None,
        )

    def unzoomed(self) -> TaskSet:
        """Every class at scale 1 (a reference zoom turned off)."""
        return replace(self, scales=None, zoomed={}, zoom=None)

    @property
    def n_tasks(self) -> int:
        return len(self.values)

    def digest(self) -> str:
        """sha256 of the embeddings and values: an output made with other tasks is redone."""
        h = hashlib.sha256()
        for name, tensor in sorted(_tensors(self).items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
        meta: list[Any] = [self.values, self.names, self.together]
        if self.scales is not None:  # a set without a zoom keeps its earlier digest
            meta.append(self.scales)
        h.update(json.dumps(meta).encode())
        return h.hexdigest()

    def metadata(self) -> dict[str, Any]:
        zoomed = self.scales is not None or bool(self.zoomed)
        out = {
            "format": FORMAT,
            "version": 3 if self.thresholds is not None else 2 if zoomed else 1,
            "values": [int(v) for v in self.values],
            "names": list(self.names),
            "network_sha256": self.network_sha256,
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "modality": self.modality,
            "references": self.references,
            "together": self.together,
        }
        if zoomed:
            out.update(scales=self.scales, zoomed=sorted(self.zoomed), zoom=self.zoom)
        if self.thresholds is not None:
            out["thresholds"] = [float(t) for t in self.thresholds]
            out["threshold_rule"] = self.threshold_rule
        return out

    def to(self, device: torch.device | str) -> TaskSet:
        return replace(
            self,
            classes=self.classes.to(device),
            global_task=self.global_task.to(device) if self.global_task is not None else None,
            zoomed={
                s: (c.to(device), g.to(device) if g is not None else None)
                for s, (c, g) in self.zoomed.items()
            },
        )


def _flatten(prefix: str, emb: TaskEmbedding) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.tokens.{lv}": t for lv, t in emb.tokens.items()}
    out[f"{prefix}.fg0"] = emb.fg0
    if emb.mem_keys is not None:  # the propagation readout's memory
        out[f"{prefix}.mem_keys"] = emb.mem_keys
        out[f"{prefix}.mem_masks"] = emb.mem_masks
    return out


def _tensors(tasks: TaskSet) -> dict[str, torch.Tensor]:
    out = _flatten("classes", tasks.classes)
    if tasks.global_task is not None:
        out.update(_flatten("global", tasks.global_task))
    for scale, (classes, global_task) in tasks.zoomed.items():
        out.update(_flatten(f"{_zoom_prefix(scale)}.classes", classes))
        if global_task is not None:
            out.update(_flatten(f"{_zoom_prefix(scale)}.global", global_task))
    return {k: v.detach().cpu().float().contiguous() for k, v in out.items()}


def _zoom_prefix(scale: float) -> str:
    return f"zoom{float(scale):g}"


def _unflatten(prefix: str, tensors: dict[str, torch.Tensor]) -> TaskEmbedding | None:
    if f"{prefix}.fg0" not in tensors:
        return None
    head = f"{prefix}.tokens."
    tokens = {int(k[len(head) :]): v for k, v in tensors.items() if k.startswith(head)}
    return TaskEmbedding(
        tokens,
        tensors[f"{prefix}.fg0"],
        tensors.get(f"{prefix}.mem_keys"),
        tensors.get(f"{prefix}.mem_masks"),
    )


def save_tasks(tasks: TaskSet, path: str | Path) -> Path:
    """Write the task set (atomically: a temporary file in the same folder, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    save_file(_tensors(tasks), str(tmp), metadata={_META_KEY: json.dumps(tasks.metadata())})
    os.replace(tmp, path)
    return path


def load_tasks(path: str | Path, network_sha256: str | None = None) -> TaskSet:
    """Read a task file; with ``network_sha256``, refuse one made by another network."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"task file {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TaskFileError(f"{path} is not a task file (safetensors): {exc}") from exc
    try:
        meta = json.loads(header[_META_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise TaskFileError(f"{path} is a safetensors file but not a maskbank task file") from exc
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise TaskFileError(
            f"{path} is a {meta.get('format')!r} file of version {meta.get('version')}; "
            f"this version reads {FORMAT!r} up to version {VERSION}"
        )
    made_by = meta.get("network_sha256")
    if network_sha256 is not None and made_by != network_sha256:
        raise TaskFileError(
            f"{path} was made by another network (sha256 {str(made_by)[:12]}...), not by the "
            f"one given (sha256 {network_sha256[:12]}...); task embeddings only mean something "
            "to the network that computed them: make the task again with this --checkpoint "
            "and --reference IMAGE MASK (--save-task FILE keeps it)"
        )
    classes = _unflatten("classes", tensors)
    if classes is None:
        raise TaskFileError(f"{path} holds no class embeddings")
    spacing = meta.get("spacing")
    zoomed = {}
    for scale in meta.get("zoomed") or []:
        found = _unflatten(f"{_zoom_prefix(scale)}.classes", tensors)
        if found is None:
            raise TaskFileError(f"{path} lists embeddings at scale {scale} but holds none")
        zoomed[float(scale)] = (found, _unflatten(f"{_zoom_prefix(scale)}.global", tensors))
    scales = meta.get("scales")
    thresholds = meta.get("thresholds")
    return TaskSet(
        classes,
        _unflatten("global", tensors),
        [int(v) for v in meta["values"]],
        [str(n) for n in meta["names"]],
        made_by,
        tuple(float(s) for s in spacing) if spacing else None,  # type: ignore[arg-type]
        meta.get("modality"),
        list(meta.get("references") or []),
        bool(meta.get("together", False)),
        [float(x) for x in scales] if scales is not None else None,
        zoomed,
        meta.get("zoom"),
        [float(t) for t in thresholds] if thresholds is not None else None,
        meta.get("threshold_rule") if thresholds is not None else None,
    )
