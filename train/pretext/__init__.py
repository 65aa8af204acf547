"""Pretext tasks for pretraining: a registry and a factory (timm style).

``create_pretext(name, cfg)`` returns an object that builds the network for a preset and
turns one augmented batch into a loss; the trainer does the rest identically for every
pretext, so their encoders are compared after the same budget on the same pairs.

* ``incontext``: in-context segmentation (the method this project pretrains with);
* ``reconstruction``: masked-volume reconstruction with the same encoder (the baseline).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maskbank.train.incontext_net import resolve_spec
from maskbank.train.pretext.base import Pretext, PretextError, PretextOutput
from maskbank.train.pretext.incontext import InContextPretext
from maskbank.train.pretext.reconstruction import ReconstructionNet, ReconstructionPretext
from maskbank.train.run_config import TrainConfig

PRETEXTS: dict[str, type[Pretext]] = {
    InContextPretext.name: InContextPretext,
    ReconstructionPretext.name: ReconstructionPretext,
}


def create_pretext(name: str, cfg: TrainConfig | Mapping[str, Any] | None = None) -> Pretext:
    """The pretext registered as ``name``, configured from a resolved config (typed, its dict
    form, or None for the defaults).

    The one place the pretext name and the config's ``model.preset`` are checked against
    their registries (``PRETEXTS``, ``train.incontext_net.PRESETS``): a ``PretextError``
    names the known ones, before any bank is opened or network built.
    """
    if name not in PRETEXTS:
        raise PretextError(
            f"unknown pretext {name!r} (config key 'pretext'); choose one of {sorted(PRETEXTS)}"
        )
    cfg = TrainConfig.coerce(cfg)
    try:
        resolve_spec(cfg.model.preset)  # the preset registry's own check
    except KeyError as exc:
        raise PretextError(f"{exc.args[0]} (config key 'model.preset')") from exc
    return PRETEXTS[name](cfg)


__all__ = [
    "PRETEXTS",
    "InContextPretext",
    "Pretext",
    "PretextError",
    "PretextOutput",
    "ReconstructionNet",
    "ReconstructionPretext",
    "create_pretext",
]
