"""The pretrained encoder an export starts from: a maskbank checkpoint, read safely.

Export only ever reads a checkpoint with ``weights_only=True`` (a checkpoint somebody sent
you runs no code) and only its encoder weights (``encoder.*``): those are what nnU-Net and
MONAI fine-tune. EMA weights are the default because they are what pretraining is for; a
checkpoint without them is refused unless the raw weights are asked for by name, so an
export never silently ships the noisier copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskbank.train.checkpointing import (
    CheckpointError,
    NoCheckpoint,
    load_checkpoint,
    resolve_checkpoint,
)
from maskbank.train.net_spec import PRESETS, NetSpec, resolve_spec

ENCODER_PREFIX = "encoder."
WEIGHTS = ("ema", "model")


class ExportError(ValueError):
    """A checkpoint or request that cannot be exported; the message says what to do."""


@dataclass
class PretrainedEncoder:
    """Encoder weights plus what the model card records about how they were made."""

    path: Path
    sha256: str
    spec: NetSpec
    preset: str
    weights: str  # "ema" or "model"
    state: dict[str, torch.Tensor]  # encoder weights, keys without the "encoder." prefix
    config: dict[str, Any]
    step: int | None
    world_size: int | None
    bank: str | None
    bank_fingerprint: str | None
    pretraining_scans: list[dict[str, Any]] | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def crop(self) -> int:
        return int(self.config.get("data", {}).get("crop", 128))

    @property
    def pretext(self) -> str:
        return str(self.config.get("pretext", "incontext"))


def checkpoint_file(location: str | Path) -> Path:
    """A .pt file, a run directory or its checkpoints/ (``resolve_checkpoint``), failing as an
    ``ExportError``."""
    try:
        return resolve_checkpoint(location)
    except NoCheckpoint as exc:
        hint = " (a run directory of `maskbank pretrain`), or give a .pt file" if exc.folder else ""
        raise ExportError(f"{exc}{hint}") from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_encoder(location: str | Path, weights: str = "ema") -> PretrainedEncoder:
    """The encoder of a pretraining checkpoint; refuses what nnU-Net/MONAI cannot take."""
    if weights not in WEIGHTS:
        raise ExportError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    path = checkpoint_file(location)
    try:
        payload = load_checkpoint(path)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    if not {"model", "config"} <= set(payload):
        raise ExportError(
            f"{path} is not a maskbank pretraining checkpoint (keys {sorted(payload)[:8]}; "
            "expected 'model' and 'config')"
        )
    config = payload["config"]
    preset = str(config.get("model", {}).get("preset", ""))
    if preset not in PRESETS:
        raise ExportError(
            f"{path} was pretrained with preset {preset!r}, which this version does not know "
            f"(have {sorted(PRESETS)})"
        )
    spec = resolve_spec(preset)
    if spec.encoder != "resenc":
        resenc = sorted(n for n, s in PRESETS.items() if s.encoder == "resenc")
        raise ExportError(
            f"{path} holds the {spec.encoder!r} encoder of preset {preset!r} (max-pooling and "
            "basic blocks), which matches no nnU-Net or MONAI architecture, so no fine-tuning "
            "framework could load it. Pretrain nnU-Net's residual encoder instead: "
            f"`maskbank pretrain BANK --config {resenc[-1]}` (GPU) or --config {resenc[0]} "
            "(CPU), then export that checkpoint"
        )
    ema = payload.get("ema")
    if weights == "ema":
        if not (isinstance(ema, dict) and isinstance(ema.get("shadow"), dict)):
            raise ExportError(
                f"{path} has no EMA weights (the averaged weights an export ships by default); "
                "pass --weights model to export the raw training weights instead"
            )
        state = ema["shadow"]
    else:
        state = payload["model"]
    encoder = {
        k[len(ENCODER_PREFIX) :]: v.float()
        for k, v in state.items()
        if k.startswith(ENCODER_PREFIX)
    }
    if not encoder:
        raise ExportError(f"{path} holds no encoder weights ('{ENCODER_PREFIX}*')")
    step = payload.get("step")
    scans = payload.get("pretraining_scans")
    return PretrainedEncoder(
        path=path,
        sha256=_sha256(path),
        spec=spec,
        preset=preset,
        weights=weights,
        state=encoder,
        config=config,
        step=int(step) if step is not None else None,
        world_size=int(payload["world_size"]) if "world_size" in payload else None,
        bank=str(payload["bank"]) if payload.get("bank") else None,
        bank_fingerprint=payload.get("bank_fingerprint"),
        pretraining_scans=[dict(r) for r in scans] if isinstance(scans, list) else None,
    )
