"""nnU-Net's residual encoder (ResEnc) as the in-context network's encoder.

Most people who would pretrain with maskbank fine-tune in nnU-Net or MONAI, and neither
can take the Iris-style encoder (max-pooling plus basic blocks). This module builds
``dynamic_network_architectures``' ``ResidualEncoder`` -- the encoder of nnU-Net's
``ResidualEncoderUNet`` -- from explicit keyword arguments, so that the in-context network's
``encoder.stem.*`` / ``encoder.stages.*`` weights carry exactly the keys and shapes nnU-Net
expects, and export (``train.export``) only has to add a fresh decoder.

The encoder is chosen by ``NetSpec.encoder`` (``"iris"`` or ``"resenc"``;
``train.incontext_net.build_encoder``). The spec's ``channels`` and ``enc_blocks`` become
``features_per_stage`` and ``n_blocks_per_stage``; kernels are 3^3, stage 0 keeps full
resolution and every later stage halves it (stride 2), so level ``i`` of the feature pyramid
runs at ``1/2**i`` of the input, as the Iris encoder's does, and the task encoding and
decoder take it unchanged. Norm and non-linearity are nnU-Net's ResEnc defaults: instance
norm with affine parameters (eps 1e-5), LeakyReLU (slope 0.01), conv bias on.

``dynamic_network_architectures`` is an optional dependency (``pip install
'maskbank[nnunet]'``): it pulls ``timm`` and ``torchvision``, which on a CPU-only torch
install would replace torch. Only the ``resenc`` encoder and nnU-Net export need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from maskbank.train.incontext_net import NetSpec

ENCODERS = ("iris", "resenc")
PACKAGE = "dynamic_network_architectures"
INSTALL_HINT = (
    "the resenc encoder needs dynamic-network-architectures: "
    "pip install 'maskbank[nnunet]' (or pip install dynamic-network-architectures==0.4.4)"
)
UNET_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
NORM_KWARGS = {"eps": 1e-05, "affine": True}
NONLIN_KWARGS = {"inplace": True}
# Keys of the full ResidualEncoderUNet that nnU-Net's pretrained-weights loaders read.
KEY_TO_ENCODER = "encoder.stages"
KEY_TO_STEM = "encoder.stem"
KEYS_TO_IN_PROJ = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
# Torch classes in the architecture kwargs, written as import paths in nnU-Net plans.
IMPORT_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin")


def require_dna() -> None:
    """Raise an ImportError naming the install command when the package is missing."""
    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


def encoder_kwargs(spec: NetSpec) -> dict[str, Any]:
    """``ResidualEncoder`` keyword arguments of ``spec`` (torch classes, not strings).

    A level with 0 blocks in an Iris preset gets 1: a ResEnc stage needs a block to hold
    its strided convolution.
    """
    n = len(spec.channels)
    return {
        "input_channels": spec.in_channels,
        "n_stages": n,
        "features_per_stage": [int(c) for c in spec.channels],
        "conv_op": nn.Conv3d,
        "kernel_sizes": [[3, 3, 3] for _ in range(n)],
        "strides": [[1, 1, 1]] + [[2, 2, 2] for _ in range(n - 1)],
        "n_blocks_per_stage": [max(1, int(b)) for b in spec.enc_blocks],
        "conv_bias": True,
        "norm_op": nn.InstanceNorm3d,
        "norm_op_kwargs": dict(NORM_KWARGS),
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": dict(NONLIN_KWARGS),
    }


def build_resenc_encoder(spec: NetSpec) -> nn.Module:
    """The ResidualEncoder of ``spec``; ``forward(x)`` -> the feature pyramid (one per stage)."""
    require_dna()
    from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

    return ResidualEncoder(**encoder_kwargs(spec), return_skips=True)


def unet_kwargs(spec: NetSpec, num_classes: int = 2) -> dict[str, Any]:
    """``ResidualEncoderUNet`` kwargs whose encoder is ``spec``'s (one conv per decoder stage,
    as nnU-Net's ResEnc plans have)."""
    kwargs = encoder_kwargs(spec)
    kwargs["num_classes"] = int(num_classes)
    kwargs["n_conv_per_stage_decoder"] = [1] * (len(spec.channels) - 1)
    return kwargs


def _import_path(obj: Any) -> Any:
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return obj


def plans_arch_kwargs(spec: NetSpec) -> dict[str, Any]:
    """The architecture block of an nnU-Net plans configuration for ``spec`` (JSON-able):
    ``network_class_name``, ``arch_kwargs`` (classes as import paths, no ``num_classes``:
    nnU-Net adds it from the dataset) and ``_kw_requires_import``."""
    kwargs = {k: _import_path(v) for k, v in encoder_kwargs(spec).items() if k != "input_channels"}
    kwargs["n_conv_per_stage_decoder"] = [1] * (len(spec.channels) - 1)
    return {
        "network_class_name": UNET_CLASS,
        "arch_kwargs": kwargs,
        "_kw_requires_import": list(IMPORT_KWARGS),
    }


def import_class(path: str | None) -> Any:
    """A class from its import path (the inverse of the plans' string form)."""
    if path is None:
        return None
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_unet(arch_kwargs: dict[str, Any], requires_import: list[str] | tuple[str, ...],
               input_channels: int, num_classes: int, class_name: str = UNET_CLASS) -> nn.Module:  # fmt: skip
    """Build the network an nnU-Net plan describes, as nnU-Net does (import the classes named
    by ``requires_import``, then call the class with the kwargs)."""
    require_dna()
    kwargs = dict(arch_kwargs)
    for key in requires_import:
        kwargs[key] = import_class(kwargs.get(key))
    cls = import_class(class_name)
    return cls(input_channels=input_channels, num_classes=num_classes, **kwargs)


def checked_spec(preset: str | dict | NetSpec, encoder: str) -> NetSpec:
    """The preset's spec, refused when its encoder is not the config's ``model.encoder``.

    The encoder belongs to the preset (evaluation, segmentation and fine-tuning baselines
    rebuild a network from the preset name alone), so a config that names another one is a
    mistake to report, not an override to apply.
    """
    from maskbank.train.incontext_net import PRESETS, resolve_spec

    spec = resolve_spec(preset)
    if spec.encoder != encoder:
        same = sorted(n for n, s in PRESETS.items() if s.encoder == encoder)
        name = preset if isinstance(preset, str) else "this network"
        raise ValueError(
            f"model.preset={name} has the {spec.encoder} encoder but model.encoder={encoder}; "
            f"the {encoder} encoder comes with the presets {', '.join(same)} "
            f"(e.g. --config {same[0]}), or drop model.encoder"
        )
    return spec
