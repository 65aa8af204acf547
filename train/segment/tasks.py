"""Task sets: the embeddings a network segments with, saved in a file that runs no code.

A task set holds one embedding per class (label value) plus the all-ones "global" task
that rode along with every pass in pretraining, and what they mean: label values and
names, the spacing and modality of the references, the references' ids, and the sha256
of the network that computed them. Embeddings only mean something to the network that
made them, so a task file is refused for any other network.

The file is safetensors: tensors plus a string header, read without unpickling.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskbank.train.incontext_net import TaskEmbedding

FORMAT = "maskbank-task"
VERSION = 1
_META_KEY = "maskbank"


class TaskFileError(ValueError):
    """A task file that cannot be used (unreadable, of another format, another network)."""


@dataclass
class TaskSet:
    """Embeddings of K classes (batch 1) + the global task, and what they stand for.

    ``together``: every pass runs all K classes (a fine-tuned network was trained so);
    otherwise classes run in groups of at most the K the network was pretrained with.
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

    def __post_init__(self) -> None:
        if len(self.values) != self.classes.n_tasks or len(self.names) != len(self.values):
            raise ValueError(
                f"{self.classes.n_tasks} class embeddings for {len(self.values)} values and "
                f"{len(self.names)} names"
            )

    @property
    def n_tasks(self) -> int:
        return len(self.values)

    def digest(self) -> str:
        """sha256 of the embeddings and values: an output made with other tasks is redone."""
        h = hashlib.sha256()
        for name, tensor in sorted(_tensors(self).items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
        h.update(json.dumps([self.values, self.names, self.together]).encode())
        return h.hexdigest()

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "values": [int(v) for v in self.values],
            "names": list(self.names),
            "network_sha256": self.network_sha256,
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "modality": self.modality,
            "references": self.references,
            "together": self.together,
        }

    def to(self, device: torch.device | str) -> TaskSet:
        return TaskSet(
            self.classes.to(device),
            self.global_task.to(device) if self.global_task is not None else None,
            self.values,
            self.names,
            self.network_sha256,
            self.spacing,
            self.modality,
            self.references,
            self.together,
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
    return {k: v.detach().cpu().float().contiguous() for k, v in out.items()}


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
    )
