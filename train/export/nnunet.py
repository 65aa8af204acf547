"""An nnU-Net checkpoint of a pretrained ResEnc encoder, self-tested before it is written.

nnU-Net takes self-supervised checkpoints in the nnssl format: a file that loads with
``torch.load(weights_only=True)`` holding ``network_weights`` (the full network's state
dict) and ``nnssl_adaptation_plan`` (how to rebuild that network and which keys are the
encoder and stem), plus ``citations``. Its loaders copy the encoder and stem and
re-initialise the rest, so the decoder here is a fresh, seeded one: only the encoder is
pretrained. The plan spells the architecture out as class name and kwargs (classes as
import paths), the form nnU-Net's own plans use, so the same block also serves the older
``-pretrained_weights`` route (``plans_architecture``).

The self-test does what a receiving nnU-Net would: rebuild the network from the plan as
written (through JSON), load the weights strictly, check the encoder and stem are exactly
the pretrained ones, and run a forward pass. A failure raises before anything is written.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from maskbank.train import resenc
from maskbank.train.export.source import ExportError, PretrainedEncoder

NUM_CLASSES = 2  # placeholder head; nnU-Net replaces it with the dataset's classes
CITATIONS = [
    "MASS (CVPR 2026): in-context segmentation of class-agnostic mask proposals as the "
    "self-supervised pretext this encoder was pretrained with.",
    "Isensee F, Jaeger PF, Kohl SAA, Petersen J, Maier-Hein KH. nnU-Net: a self-configuring "
    "method for deep learning-based biomedical image segmentation. Nature Methods 18, "
    "203-211 (2021).",
    "Isensee F, Wald T, Ulrich C, Baumgartner M, Roy S, Maier-Hein K, Jaeger PF. nnU-Net "
    "Revisited: A Call for Rigorous Validation in 3D Medical Image Segmentation. MICCAI 2024 "
    "(the ResEnc presets).",
    "maskbank: mask-guided self-supervised pretraining infrastructure for 3D medical imaging.",
]
PLAN_NAME = "maskbank"


def median_spacing(spacings: list[Any]) -> list[float] | None:
    """Per-axis median of the pretraining scans' spacings (None when unknown)."""
    rows = [tuple(float(v) for v in s) for s in spacings if s is not None and len(s) == 3]
    if not rows:
        return None
    return [float(torch.tensor([r[i] for r in rows]).median()) for i in range(3)]


def adaptation_plan(
    enc: PretrainedEncoder, spacing: list[float] | None, normalisation: dict[str, Any]
) -> dict[str, Any]:
    """The ``nnssl_adaptation_plan`` of ``enc`` (plain JSON types only)."""
    arch = resenc.plans_arch_kwargs(enc.spec)
    patch = [enc.crop] * 3
    return {
        "architecture_plans": {
            "arch_class_name": arch["network_class_name"],
            "arch_kwargs": arch["arch_kwargs"],
            "arch_kwargs_requiring_import": arch["_kw_requires_import"],
        },
        "pretrain_plan": {
            "dataset_name": PLAN_NAME,
            "plans_name": f"{PLAN_NAME}_{enc.preset}",
            "original_median_spacing_after_transp": spacing,
            "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "maskbank",
            "configurations": {
                PLAN_NAME: {
                    "data_identifier": f"{PLAN_NAME}_{enc.preset}",
                    "spacing": spacing,
                    "spacing_style": "fixed" if spacing is not None else "noresample",
                    "patch_size": patch,
                    # What nnU-Net applies downstream; maskbank's own (CT clipped first)
                    # is in maskbank_normalisation.
                    "normalization_schemes": ["ZScoreNormalization"],
                    "use_mask_for_norm": [False],
                    "maskbank_normalisation": normalisation,
                }
            },
        },
        "pretrain_num_input_channels": enc.spec.in_channels,
        "recommended_downstream_patchsize": patch,
        "key_to_encoder": resenc.KEY_TO_ENCODER,
        "key_to_stem": resenc.KEY_TO_STEM,
        "keys_to_in_proj": list(resenc.KEYS_TO_IN_PROJ),
        "key_to_lpe": None,
    }


def network_from_plan(plan: dict[str, Any], num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """The network an adaptation plan describes, built the way nnU-Net builds it."""
    arch = plan["architecture_plans"]
    return resenc.build_unet(
        arch["arch_kwargs"],
        arch["arch_kwargs_requiring_import"],
        int(plan["pretrain_num_input_channels"]),
        num_classes,
        arch["arch_class_name"],
    )


def network_weights(enc: PretrainedEncoder, plan: dict[str, Any], seed: int = 0) -> dict:
    """The full ResidualEncoderUNet state dict: pretrained encoder, seeded fresh decoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = network_from_plan(plan)
    try:
        net.encoder.load_state_dict(enc.state, strict=True)
    except RuntimeError as exc:
        raise ExportError(
            f"{enc.path}: its encoder does not fit the ResidualEncoder its preset "
            f"{enc.preset!r} describes: {str(exc).splitlines()[0]}"
        ) from exc
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def self_test(payload: dict[str, Any], enc: PretrainedEncoder) -> dict[str, Any]:
    """Rebuild from the plan (via JSON), strict load, encoder/stem equal, forward pass."""
    plan = json.loads(json.dumps(payload["nnssl_adaptation_plan"]))
    net = network_from_plan(plan)
    try:
        net.load_state_dict(payload["network_weights"], strict=True)
    except RuntimeError as exc:
        raise ExportError(f"self-test: the weights do not load strictly: {exc}") from exc
    state = net.state_dict()
    checked = 0
    for prefix in (plan["key_to_stem"], plan["key_to_encoder"]):
        keys = [k for k in state if k.startswith(prefix + ".")]
        if not keys:
            raise ExportError(f"self-test: no weights under {prefix!r}")
        for key in keys:
            own = enc.state[key[len("encoder.") :]]
            if not torch.equal(state[key], own):
                raise ExportError(f"self-test: {key} differs from the pretrained weight")
            checked += 1
    for key in plan["keys_to_in_proj"]:
        net.get_submodule(key)  # raises when the plan names a module the network lacks
    edge = 2 ** len(enc.spec.channels)  # 2^3 at the bottom: instance norm needs > 1 voxel
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, enc.spec.in_channels, edge, edge, edge))
    out = out[0] if isinstance(out, (list, tuple)) else out
    if tuple(out.shape) != (1, NUM_CLASSES, edge, edge, edge) or not torch.isfinite(out).all():
        raise ExportError(f"self-test: forward pass gave {tuple(out.shape)} / non-finite output")
    return {"strict_load": True, "pretrained_tensors_equal": checked, "forward": [edge] * 3}


def nnunet_checkpoint(
    enc: PretrainedEncoder, spacing: list[float] | None, normalisation: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint_final.pth payload, self-test report); raises ExportError on a failure."""
    plan = adaptation_plan(enc, spacing, normalisation)
    payload = {
        "network_weights": network_weights(enc, plan),
        "nnssl_adaptation_plan": plan,
        "citations": list(CITATIONS),
    }
    report = self_test(payload, enc)
    return payload, report


def plans_architecture(enc: PretrainedEncoder) -> dict[str, Any]:
    """The ``architecture`` block of an nnU-Net plans configuration building this network
    (for the ``-pretrained_weights`` route: every key but the head must match)."""
    return resenc.plans_arch_kwargs(enc.spec)
