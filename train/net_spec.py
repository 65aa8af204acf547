"""The in-context network's architecture: ``NetSpec`` and the named presets (the registry).

Kept apart from the network so that a spec can be named, checked and recorded (configs,
checkpoints, export, the resenc encoder) without building a model; ``train.incontext_net``
builds the network a spec describes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class NetSpec:
    """Architecture hyper-parameters; one per preset in ``PRESETS``."""

    channels: tuple[int, ...]  # encoder channels per level, level 0 = full resolution
    enc_blocks: tuple[int, ...]  # residual blocks per encoder level
    dec_blocks: int = 1  # residual blocks per decoder level
    token_levels: tuple[int, ...] = (2, 3)  # levels with task tokens (deep = cheap)
    n_query_tokens: int = 8
    head_dim: int = 32  # attention head width
    in_channels: int = 1
    per_task: bool = False  # decode each task in its own pass (see the module docstring)
    prior_levels: tuple[int, ...] = ()  # levels of the similarity prior (0 or token levels)
    # "iris" (the published encoder) or "resenc": nnU-Net's residual encoder, so the
    # pretrained weights load into nnU-Net and MONAI (train.resenc, train.export)
    encoder: str = "iris"
    readout: str = "none"  # "propagation": mask-propagation readout (train.readout)
    readout_level: int = 2  # encoder level the readout matches query and reference at
    readout_dim: int = 32  # width of its keys
    readout_refine: int = 0  # > 0: full-resolution per-task refinement of that width
    readout_context: bool = False  # keys also see the next coarser level (upsampled)
    # the memory's mask values: min(1, gain * occupancy); > 1 makes a cell a small structure
    # only partly covers read as present (1: plain occupancy)
    readout_gain: float = 1.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, NetSpec] = {
    # CPU tests: a step on a 32^3 crop takes well under a second.
    "tiny": NetSpec(
        channels=(8, 16, 32, 32),
        enc_blocks=(0, 1, 1, 1),
        dec_blocks=0,
        token_levels=(2, 3),
        n_query_tokens=4,
        readout="propagation",
        readout_context=True,
    ),
    "small": NetSpec(
        channels=(16, 32, 64, 128, 256),
        enc_blocks=(1, 1, 2, 2, 2),
        token_levels=(2, 3, 4),
        readout="propagation",
        readout_level=3,  # 12^3 positions at crop 96 (level 2: 24^3, a 14k x 14k affinity)
        readout_context=True,
    ),
    # The published size: channels 32-512, ~120 M parameters.
    "base": NetSpec(
        channels=(32, 64, 128, 256, 512),
        enc_blocks=(1, 2, 2, 4, 6),
        dec_blocks=1,
        token_levels=(2, 3, 4),
        n_query_tokens=10,
        readout="propagation",
        readout_level=3,  # 16^3 positions at crop 128, a 4k x 4k affinity per sample
        readout_context=True,
    ),
}
# nnU-Net's residual encoder under the same in-context network (task encoding, decoder,
# readout) as the Iris preset it is named after, so the two differ by the encoder alone:
# resenc-tiny has tiny's widths (CPU tests, the demo); resenc-l is nnU-Net's ResEnc-L
# encoder (features 32-320, blocks 1, 3, 4, 6, 6, 6) under base's in-context parts.
PRESETS["resenc-tiny"] = replace(PRESETS["tiny"], enc_blocks=(1, 1, 1, 1), encoder="resenc")
PRESETS["resenc-l"] = replace(
    PRESETS["base"],
    channels=(32, 64, 128, 256, 320, 320),
    enc_blocks=(1, 3, 4, 6, 6, 6),
    encoder="resenc",
)


def resolve_spec(preset: str | NetSpec | dict) -> NetSpec:
    """A preset name, a NetSpec, or a dict of NetSpec fields -> the NetSpec (the registry)."""
    if isinstance(preset, NetSpec):
        return preset
    if isinstance(preset, dict):
        return NetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in preset.items()})
    if preset not in PRESETS:
        raise KeyError(f"unknown model preset '{preset}' (have {sorted(PRESETS)})")
    return PRESETS[preset]
