"""What every pretext provides to the trainer, so the loop itself stays pretext-agnostic.

A pretext owns the two things that differ between pretraining objectives: the network
built for a preset, and how one augmented batch becomes a loss. Everything else (bank,
sampler, augmentation, optimiser, schedule, EMA, logging, checkpoints) is the trainer's,
so two pretexts trained with the same config spend the same budget on the same pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from maskbank.train.run_config import TrainConfig


class PretextError(ValueError):
    """A pretext that cannot be used as configured (the trainer exits 2 with the message)."""


@dataclass
class PretextOutput:
    """One step's loss, its logged parts and tensors the image log may show."""

    loss: torch.Tensor
    parts: dict[str, float]
    visuals: dict[str, torch.Tensor] = field(default_factory=dict)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] for an image tile (constant tiles stay finite)."""
    x = x.float()
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)


class Pretext:
    """Base class; subclasses set ``name`` and implement the three methods below."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def build_model(self, preset: str | dict) -> nn.Module:
        """The network trained by this pretext; it has a ``min_size`` (crop edge divisor)."""
        raise NotImplementedError

    def __call__(
        self,
        net: nn.Module,
        aug: dict[str, torch.Tensor],
        gen: torch.Generator,
        bf16: bool = False,
    ) -> PretextOutput:
        """Loss of one augmented batch; ``gen`` is the step's generator (exact resume)."""
        raise NotImplementedError

    def image_tiles(
        self, aug: dict[str, torch.Tensor], out: PretextOutput
    ) -> tuple[str, list[torch.Tensor]]:
        """A TensorBoard tag and 2-D tiles (mid-slices of the first pair) to show side by side."""
        raise NotImplementedError
