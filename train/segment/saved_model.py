"""A fine-tuned network saved for segmenting new scans, without pickle.

``DIR/model.safetensors`` holds the network's weights (``net.*``) and its class
embeddings (``classes.*`` and the global task ``global.*``, as `train.segment.tasks`
writes them); ``DIR/model.json`` says what they are: the architecture, the crop, the
classes' label values and names, and the spacing and modality the network was trained
at. Loading builds the architecture from the JSON and fills it from the tensors: nothing
in the folder is executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskbank.train.evaluation.checkpoint import file_sha256
from maskbank.train.incontext_net import InContextSegNet, TaskEmbedding, build_model

from .tasks import TaskSet, _flatten, _unflatten

FORMAT = "maskbank-finetuned"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "model.json"


class SavedModelError(ValueError):
    """A saved-model folder that cannot be used."""


@dataclass
class SavedNetwork:
    """A loaded fine-tuned network with its classes (a `TaskSet` run all together)."""

    model: InContextSegNet
    tasks: TaskSet
    crop: int
    preset: str
    sha256: str
    config: dict[str, Any]


def is_saved_model(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def save_finetuned(
    directory: str | Path,
    net: InContextSegNet,
    tasks: TaskEmbedding,
    values: list[int],
    names: list[str],
    *,
    preset: str,
    crop: int,
    spacing: tuple[float, float, float] | None,
    modality: str | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory`` (weights first, the JSON last: a folder with both is complete).

    ``tasks`` holds K class embeddings followed by the global task (K + 1), as the
    fine-tuning trains them.
    """
    from safetensors.torch import save_file

    if tasks.n_tasks != len(values) + 1 or len(names) != len(values):
        raise ValueError(
            f"{tasks.n_tasks} task embeddings for {len(values)} classes: expected the classes "
            "followed by the global task"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    k = len(values)
    tensors = {f"net.{n}": t for n, t in net.state_dict().items()}
    tensors.update(_flatten("classes", tasks.select(list(range(k)))))
    tensors.update(_flatten("global", tasks.select([k])))
    tensors = {n: t.detach().cpu().contiguous().clone() for n, t in tensors.items()}
    tmp = directory / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / WEIGHTS)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "preset": preset,
        "spec": net.spec.to_dict(),
        "crop": int(crop),
        "values": [int(v) for v in values],
        "names": [str(n) for n in names],
        "spacing": list(spacing) if spacing is not None else None,
        "modality": modality,
        **(extra or {}),
    }
    tmp = directory / f".{CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=1))
    os.replace(tmp, directory / CONFIG)
    return directory


def load_finetuned(directory: str | Path) -> SavedNetwork:
    """Load a folder written by `save_finetuned`; `SavedModelError` says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not is_saved_model(directory):
        raise SavedModelError(f"{directory} holds no {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads((directory / CONFIG).read_text())
        tensors = load_file(str(directory / WEIGHTS))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise SavedModelError(f"{directory}: unreadable saved model ({exc})") from exc
    if config.get("format") != FORMAT or int(config.get("version", 0)) > VERSION:
        raise SavedModelError(
            f"{directory}/{CONFIG} is not a {FORMAT!r} file of version <= {VERSION}"
        )
    model = build_model(config["spec"])
    state = {n[4:]: t for n, t in tensors.items() if n.startswith("net.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SavedModelError(f"{directory}: weights do not fit the saved architecture") from exc
    classes, global_task = _unflatten("classes", tensors), _unflatten("global", tensors)
    if classes is None:
        raise SavedModelError(f"{directory}: no class embeddings")
    sha = file_sha256(directory / WEIGHTS)
    spacing = config.get("spacing")
    tasks = TaskSet(
        classes,
        global_task,
        [int(v) for v in config["values"]],
        [str(n) for n in config["names"]],
        sha,
        tuple(float(s) for s in spacing) if spacing else None,  # type: ignore[arg-type]
        config.get("modality"),
        [{"finetuned": str(directory)}],
        together=True,
    )
    return SavedNetwork(
        model.eval(), tasks, int(config["crop"]), str(config["preset"]), sha, config
    )


def finetuned_saver(
    directory: str | Path,
    classes: list[Any],
    preset: str,
    crop: int,
    scans: list[Any],
    source_sha256: str | None = None,
) -> Callable[[Any], Path]:
    """A callback saving a fine-tuned ``FixedTaskNet`` (``.net``, ``.tasks()``) to ``directory``.

    ``classes`` are the evaluation's structure classes (``value``, ``name``, ``key``), in
    the order of the network's class embeddings; ``scans`` (``spacing``, ``scan.modality``)
    give the spacing and modality it was trained at (the most common ones). Label values
    are kept when they are unique, else the classes are numbered 1..K (classes of several
    datasets may share a value); ``classes`` in the JSON maps each back.
    """
    from collections import Counter

    values = [int(c.value) for c in classes]
    unique = len(set(values)) == len(values)
    names = [str(c.name if unique else c.key) for c in classes]
    if not unique:
        values = list(range(1, len(classes) + 1))
    spacings = Counter(tuple(float(v) for v in s.spacing) for s in scans)
    modalities = Counter(getattr(getattr(s, "scan", None), "modality", None) for s in scans)
    spacing = spacings.most_common(1)[0][0] if spacings else None
    modality = modalities.most_common(1)[0][0] if modalities else None
    extra = {
        "classes": [
            {"value": v, "dataset": c.dataset, "bank_value": int(c.value), "name": n}
            for v, c, n in zip(values, classes, names, strict=True)
        ],
        "source_sha256": source_sha256,
    }

    def save(model: Any) -> Path:
        return save_finetuned(
            directory, model.net, model.tasks(), values, names, preset=preset, crop=crop,
            spacing=spacing, modality=modality, extra=extra,
        )  # fmt: skip

    return save
