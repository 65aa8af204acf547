"""The network a segmentation runs, and the spacing its inputs must be resampled to.

A pretraining checkpoint (file or run folder, loaded with ``weights_only=True``) or a
fine-tuned network saved by ``maskbank evaluate finetune --save-model DIR``.

The checkpoint does not record a voxel spacing itself; it records the bank it was
pretrained on, whose scans do. So the spacing is, in this order: the one given
(``--spacing``), the task file's or the saved model's, the pretraining bank's (the most
common spacing of its scans), else `PrepareConfig`'s default, and the run says which.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskbank.pipeline.config import PrepareConfig
from maskbank.train.evaluation.checkpoint import load_network
from maskbank.train.evaluation.errors import EvaluationError
from maskbank.train.incontext_net import InContextSegNet
from maskbank.train.segment.saved_model import SavedModelError, is_saved_model, load_finetuned
from maskbank.train.segment.tasks import TaskSet

from .errors import SegmentError


@dataclass
class Network:
    model: InContextSegNet
    crop: int
    max_group: int  # classes per pass: the K the network was pretrained with
    sha256: str | None
    source: str
    preset: str
    finetuned: TaskSet | None = None  # a fine-tuned network's own classes
    bank: str | None = None  # the pretraining bank the checkpoint records

    def describe(self) -> dict[str, Any]:
        return {
            "checkpoint": self.source,
            "network_sha256": self.sha256,
            "preset": self.preset,
            "crop": self.crop,
            "finetuned": self.finetuned is not None,
        }


def _recorded_bank(path: str) -> str | None:
    """The pretraining bank a checkpoint names (memory-mapped: no weights are read)."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable here means: not recorded
        return None
    bank = payload.get("bank") if isinstance(payload, dict) else None
    return str(bank) if bank else None


def load(checkpoint: str) -> Network:
    """Load ``checkpoint``; `SegmentError` when it is not a network this version runs."""
    if is_saved_model(checkpoint):
        try:
            saved = load_finetuned(checkpoint)
        except SavedModelError as exc:
            raise SegmentError(str(exc)) from exc
        k = saved.tasks.n_tasks
        return Network(
            saved.model, saved.crop, k, saved.sha256, checkpoint, saved.preset, saved.tasks
        )
    if checkpoint in ("random", "scratch"):
        raise SegmentError(
            "--checkpoint must be a trained network (a pretraining run or checkpoint, or a "
            "folder saved by `maskbank evaluate finetune --save-model`), not an untrained one"
        )
    try:
        net = load_network(checkpoint)
    except EvaluationError as exc:
        raise SegmentError(str(exc)) from exc
    k = int(net.config.get("data", {}).get("k", 13))
    return Network(
        net.model, net.crop, k, net.sha256, net.source, net.preset, None, _recorded_bank(net.source)
    )


def bank_spacing(location: str) -> tuple[float, float, float] | None:
    """The most common spacing of a bank's scans, or None when it cannot be opened."""
    try:
        from maskbank.bank import Bank

        rows = Bank.open(location).index
    except Exception:  # noqa: BLE001 - a moved or remote bank: fall back, and say so
        return None
    counts = Counter(tuple(float(v) for v in r["spacing"]) for r in rows if r.get("spacing"))
    return counts.most_common(1)[0][0] if counts else None  # type: ignore[return-value]


def resolve_spacing(
    given: tuple[float, float, float] | None, net: Network, tasks: TaskSet | None
) -> tuple[tuple[float, float, float], str]:
    """``(spacing, where it came from)``; warns when it had to fall back to the default."""
    if given is not None:
        return tuple(float(v) for v in given), "--spacing"  # type: ignore[return-value]
    if tasks is not None and tasks.spacing is not None:
        where = "the fine-tuned network" if net.finetuned is not None else "the task file"
        return tasks.spacing, where
    if net.bank:
        found = bank_spacing(net.bank)
        if found is not None:
            return found, f"the pretraining bank {net.bank}"
    default = PrepareConfig().spacing
    print(
        f"warning: {Path(net.source).name} records no spacing and its pretraining bank "
        f"{net.bank or '(none recorded)'} cannot be read; resampling to {default} mm "
        "(PrepareConfig's default): pass --spacing if the network was pretrained at another",
        file=sys.stderr,
    )
    return default, "default"
