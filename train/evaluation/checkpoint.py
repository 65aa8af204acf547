"""Load the network an evaluation runs: a trained checkpoint, or a seeded untrained floor.

Checkpoints are read with ``weights_only=True`` (``train.checkpointing.load_checkpoint``):
evaluating a checkpoint somebody sent you never runs code from it. EMA weights are
used when the checkpoint has them (they are what pretraining is for). A checkpoint of
another pretext (masked-volume reconstruction) brings its encoder only; the rest of
the in-context network keeps the seeded initialisation it would have untrained.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskbank.train.checkpointing import (
    CheckpointError,
    NoCheckpoint,
    load_checkpoint,
    resolve_checkpoint,
)
from maskbank.train.incontext_net import PRESETS, InContextSegNet, build_model
from maskbank.train.run_config import ConfigError, TrainConfig
from maskbank.train.seeding import seeded_torch

from .errors import EvaluationError

RANDOM = "random"  # --checkpoint random: the untrained floor
SCRATCH = "scratch"  # --checkpoint scratch (fine-tuning): the same, trained from nothing
ENCODER_PREFIX = "encoder."


@dataclass
class LoadedNetwork:
    """The network plus what results.json records about where it came from."""

    model: InContextSegNet
    preset: str
    crop: int  # the preset's training crop edge: reference crops and sliding windows
    source: str  # checkpoint path, or "random" / "scratch"
    weights: str  # "ema", "model", "encoder" (other pretext) or "random"
    pretext: str
    sha256: str | None = None
    step: int | None = None
    train_config: TrainConfig | None = None  # the checkpoint's (None: an untrained network)
    # [{"scan_id", "source_sha256"}] of the pretraining bank's scans it sampled from, as the
    # checkpoint records them (None: an untrained network, or a checkpoint that does not say)
    pretraining_scans: list[dict[str, Any]] | None = None

    @property
    def config(self) -> dict[str, Any]:
        """The training config's plain form, as results.json records it ({} untrained)."""
        return self.train_config.to_dict() if self.train_config is not None else {}

    @property
    def task_group(self) -> int:
        """Tasks per forward pass the network was trained with (the preset default untrained)."""
        return (self.train_config or TrainConfig()).data.k

    @property
    def label(self) -> str:
        """Short name for tables: 'random', 'scratch' or '<run>@<step>'."""
        if self.sha256 is None:
            return self.source
        path = Path(self.source)
        run = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
        return f"{run}@{self.step}" if self.step is not None else run

    def describe(self) -> dict[str, Any]:
        return {
            "checkpoint": self.source,
            "label": self.label,
            "sha256": self.sha256,
            "step": self.step,
            "preset": self.preset,
            "crop": self.crop,
            "weights": self.weights,
            "pretext": self.pretext,
            "config": self.config,
            "pretraining_scans": (
                len(self.pretraining_scans) if self.pretraining_scans is not None else None
            ),
        }


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints are recorded by content)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checkpoint_file(location: str) -> Path:
    """A checkpoint file, a run directory or its checkpoints/ (``resolve_checkpoint``); a
    missing one is told what else evaluation takes ('random')."""
    try:
        return resolve_checkpoint(location)
    except NoCheckpoint as exc:
        hint = (
            " (a run directory of `maskbank pretrain`), or give a .pt file"
            if exc.folder
            else "; give a file written by `maskbank pretrain` (OUT/checkpoints/last.pt), "
            f"a run directory, or '{RANDOM}' for the untrained floor"
        )
        raise EvaluationError(f"{exc}{hint}") from exc


def _preset_crop(preset: str) -> int:
    try:
        return TrainConfig.load(preset).data.crop
    except FileNotFoundError:
        return TrainConfig.load(None).data.crop


def untrained(preset: str, seed: int = 0, source: str = RANDOM) -> LoadedNetwork:
    """The seeded untrained network of ``preset`` (the floor every evaluation reports)."""
    if preset not in PRESETS:
        raise EvaluationError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    with seeded_torch(seed):  # the weights depend on the seed only; the caller's RNG is left
        model = build_model(preset)
    return LoadedNetwork(model, preset, _preset_crop(preset), source, "random", "none")


def _weights(
    payload: dict[str, Any], config: TrainConfig, reference: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], str]:
    """The state to load (EMA when present; another pretext's encoder over ``reference``)."""
    ema = payload.get("ema")
    state = ema["shadow"] if isinstance(ema, dict) and "shadow" in ema else payload["model"]
    weights = "ema" if state is not payload["model"] else "model"
    if config.pretext != "incontext":
        state = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        weights = "encoder"
        expected = {k for k in reference if k.startswith(ENCODER_PREFIX)}
    else:
        expected = set(reference)
    missing = sorted(expected - set(state))
    wrong = sorted(
        k for k in expected & set(state) if tuple(state[k].shape) != tuple(reference[k].shape)
    )
    if missing or wrong:
        raise EvaluationError(
            f"{path} does not fit the {config.model.preset!r} network of this version: "
            f"{len(missing)} weights missing (e.g. {missing[:2]}), {len(wrong)} of another "
            f"shape (e.g. {wrong[:2]})"
        )
    merged = dict(reference)
    merged.update({k: state[k].to(reference[k].dtype) for k in expected})
    return merged, weights


def load_network(checkpoint: str, preset: str | None = None, seed: int = 0) -> LoadedNetwork:
    """``checkpoint`` is a file or run directory, or 'random'/'scratch' (then ``preset``)."""
    if checkpoint in (RANDOM, SCRATCH):
        return untrained(preset or "tiny", seed, checkpoint)
    path = _checkpoint_file(checkpoint)
    try:
        payload = load_checkpoint(path)
    except CheckpointError as exc:
        raise EvaluationError(str(exc)) from exc
    if not {"model", "config"} <= set(payload):
        raise EvaluationError(
            f"{path} is not a maskbank pretraining checkpoint (it has keys "
            f"{sorted(payload)[:8]}; expected 'model' and 'config')"
        )
    try:
        config = TrainConfig.coerce(payload["config"])
    except (ConfigError, TypeError) as exc:
        raise EvaluationError(f"{path}: its training config cannot be read ({exc})") from exc
    ck_preset = config.model.preset
    if preset is not None and preset != ck_preset:
        raise EvaluationError(
            f"{path} holds a {ck_preset!r} network but --preset {preset} was given; "
            f"drop --preset or pass --preset {ck_preset}"
        )
    if ck_preset not in PRESETS:
        raise EvaluationError(
            f"{path} was trained with preset {ck_preset!r}, which this version does not know "
            f"(have {sorted(PRESETS)})"
        )
    net = untrained(ck_preset, seed)
    state, weights = _weights(payload, config, net.model.state_dict(), path)
    model = net.model
    model.load_state_dict(state)
    crop = config.data.crop
    step = payload.get("step")
    record = payload.get("pretraining_scans")
    return LoadedNetwork(
        model,
        ck_preset,
        crop,
        str(path),
        weights,
        config.pretext,
        file_sha256(path),
        int(step) if step is not None else None,
        config,
        [dict(r) for r in record] if isinstance(record, list) else None,
    )


def load_with_baseline(
    checkpoint: str,
    baseline: str = RANDOM,
    preset: str | None = None,
    seed: int = 0,
    add_baseline: bool = True,
) -> list[LoadedNetwork]:
    """The checkpoint's network, then ``baseline`` (random or scratch) of its preset and crop.

    With ``checkpoint`` itself untrained (``random``/``scratch``) that is the only network.
    """
    untrained_given = checkpoint in (RANDOM, SCRATCH)
    first = load_network(baseline if untrained_given else checkpoint, preset, seed)
    nets = [first]
    if not untrained_given and add_baseline:
        base = load_network(baseline, first.preset, seed)
        base.crop = first.crop  # the same reference crops, windows and training crops
        nets.append(base)
    return nets
