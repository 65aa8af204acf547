"""A MONAI bundle of the exported network: fine-tuning and inference configs, weights, card.

The bundle's ``network_def`` builds the same ``ResidualEncoderUNet`` the nnU-Net export
writes (from the same kwargs), so ``models/model.pt`` loads into it strictly, and
``monai.bundle`` tools (``verify_net_in_out``, ``ConfigWorkflow``, ``load``) work on it
offline. Fine-tuning copies every weight but the segmentation head
(``copy_model_state(..., exclude_vars=...)``), as a task with another number of classes
needs. Preprocessing mirrors the bank's: RAS, the pretraining spacing, z-score inside
the image (CT clipped to maskbank's HU window first), so the encoder sees what it saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from maskbank.train import resenc
from maskbank.train.export.source import PretrainedEncoder

BUNDLE_VERSION = "0.1.0"
HEAD_KEYS = r"decoder\.seg_layers\..*"


def network_def(enc: PretrainedEncoder, num_classes: str | int) -> dict[str, Any]:
    """MONAI config of the network: ``_target_`` class path and its kwargs."""
    kwargs = resenc.encoder_kwargs(enc.spec)
    out: dict[str, Any] = {"_target_": resenc.UNET_CLASS}
    for key, value in kwargs.items():
        out[key] = f"${value.__module__}.{value.__qualname__}" if isinstance(value, type) else value
    out["num_classes"] = num_classes
    out["n_conv_per_stage_decoder"] = [1] * (len(enc.spec.channels) - 1)
    out["deep_supervision"] = False
    return out


def _transforms(spacing: list[float] | None, ct_clip: list[float], train: bool) -> list[dict]:
    keys = ["image", "label"] if train else ["image"]
    t: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"},
    ]
    if spacing is not None:
        modes = ["bilinear", "nearest"] if train else ["bilinear"]
        t.append({"_target_": "Spacingd", "keys": keys, "pixdim": spacing, "mode": modes})
    t.append(
        {
            "_target_": "ScaleIntensityRanged",
            "_disabled_": "$not @is_ct",
            "keys": "image",
            "a_min": ct_clip[0],
            "a_max": ct_clip[1],
            "b_min": ct_clip[0],
            "b_max": ct_clip[1],
            "clip": True,
        }
    )
    t.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": False})
    t.append({"_target_": "EnsureTyped", "keys": keys})
    return t


def train_config(enc: PretrainedEncoder, spacing: list[float] | None, ct_clip: list[float]) -> dict:
    """Fine-tuning: pretrained encoder, fresh head, the bank's preprocessing, SGD as nnU-Net's
    pretrained trainer uses (lr 1e-3)."""
    patch = [enc.crop] * 3
    return {
        "imports": ["$import torch", "$import monai", "$import glob"],
        "bundle_root": ".",
        "dataset_dir": "/data/task",
        "datalist": "$@bundle_root + '/configs/datalist.json'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "is_ct": True,
        "num_classes": 2,
        "patch_size": patch,
        "pretrained": "$@bundle_root + '/models/model.pt'",
        "finetuned": "$@bundle_root + '/models/model_finetuned.pt'",
        "network_def": network_def(enc, "@num_classes"),
        "network": "$@network_def.to(@device)",
        "load_pretrained": (
            "$monai.networks.utils.copy_model_state(@network, "
            "torch.load(@pretrained, map_location='cpu', weights_only=True), "
            f"exclude_vars=r'{HEAD_KEYS}')"
        ),
        "loss": {
            "_target_": "DiceCELoss",
            "to_onehot_y": True,
            "softmax": True,
            "include_background": False,
        },
        "optimizer": {
            "_target_": "torch.optim.SGD",
            "params": "$@network.parameters()",
            "lr": 0.001,
            "momentum": 0.99,
            "nesterov": True,
            "weight_decay": 3e-05,
        },
        "train": {
            "preprocessing": {
                "_target_": "Compose",
                "transforms": _transforms(spacing, ct_clip, train=True)
                + [
                    {
                        "_target_": "RandCropByPosNegLabeld",
                        "keys": ["image", "label"],
                        "label_key": "label",
                        "spatial_size": "@patch_size",
                        "pos": 1,
                        "neg": 1,
                        "num_samples": 2,
                    }
                ],
            },
            "dataset": {
                "_target_": "Dataset",
                "data": "$monai.data.load_decathlon_datalist(@datalist, True, 'training', "
                "@dataset_dir)",
                "transform": "@train#preprocessing",
            },
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@train#dataset",
                "batch_size": 2,
                "shuffle": True,
                "num_workers": 4,
            },
            "inferer": {"_target_": "SimpleInferer"},
            "trainer": {
                "_target_": "SupervisedTrainer",
                "max_epochs": 1000,
                "device": "@device",
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "loss_function": "@loss",
                "optimizer": "@optimizer",
                "inferer": "@train#inferer",
            },
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)", "$@load_pretrained"],
        "run": ["$@train#trainer.run()", "$torch.save(@network.state_dict(), @finetuned)"],
    }


def inference_config(
    enc: PretrainedEncoder, spacing: list[float] | None, ct_clip: list[float]
) -> dict[str, Any]:
    """Sliding-window inference with the bundle's weights (after fine-tuning: its own)."""
    return {
        "imports": ["$import torch", "$import monai", "$import glob"],
        "bundle_root": ".",
        "dataset_dir": "/data/task/imagesTs",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "is_ct": True,
        "num_classes": 2,
        "patch_size": [enc.crop] * 3,
        "network_def": network_def(enc, "@num_classes"),
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(@dataset_dir + '/*.nii.gz'))]",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": _transforms(spacing, ct_clip, train=False),
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "@datalist",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 2,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": "@patch_size",
            "sw_batch_size": 2,
            "overlap": 0.5,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "meta_keys": "image_meta_dict",
                    "output_dir": "@output_dir",
                    "resample": False,
                },
            ],
        },
        "load_weights": (
            "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, "
            "weights_only=True), strict=True)"
        ),
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
        },
        "initialize": ["$@load_weights"],
        "run": ["$@evaluator.run()"],
    }


def metadata(enc: PretrainedEncoder, license_id: str) -> dict[str, Any]:
    """configs/metadata.json: versions, description and the network's data format."""
    import monai
    import numpy

    try:
        from importlib.metadata import version

        dna = version("dynamic-network-architectures")
    except Exception:  # the package is needed to build the network; record what is known
        dna = "unknown"
    edge = 2 ** (len(enc.spec.channels) - 1)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20240725.json",
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "exported from a maskbank pretraining checkpoint"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"dynamic-network-architectures": dna},
        "name": f"maskbank {enc.preset} encoder",
        "task": "3D segmentation (fine-tune the pretrained encoder on a labelled task)",
        "description": "nnU-Net ResidualEncoderUNet whose encoder was pretrained by maskbank "
        "(in-context segmentation of mask proposals); decoder and head freshly initialised.",
        "authors": "maskbank",
        "copyright": "see LICENSE",
        "license": license_id,
        "data_source": "the pretraining bank recorded in docs/README.md",
        "data_type": "nibabel",
        "image_classes": "single-channel CT, MR or PET volume",
        "label_classes": "0 background, 1 foreground (set num_classes for the task)",
        "pred_classes": "argmax over num_classes",
        "intended_use": "initialisation for fine-tuning; not for clinical use",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "CT, MR or PET",
                    "num_channels": enc.spec.in_channels,
                    "spatial_shape": [f"{edge}*n"] * 3,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": [f"{edge}*n"] * 3,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "background", "1": "foreground"},
                }
            },
        },
    }


def write_bundle(
    out: Path,
    enc: PretrainedEncoder,
    weights: dict[str, torch.Tensor],
    spacing: list[float] | None,
    ct_clip: list[float],
    card: str,
    license_text: str,
    license_id: str,
) -> list[Path]:
    """Write the bundle's files under ``out``; returns them."""
    files = {
        out / "configs" / "metadata.json": json.dumps(metadata(enc, license_id), indent=2),
        out / "configs" / "train.json": json.dumps(train_config(enc, spacing, ct_clip), indent=2),
        out / "configs" / "inference.json": json.dumps(
            inference_config(enc, spacing, ct_clip), indent=2
        ),
        out / "docs" / "README.md": card,
        out / "LICENSE": license_text,
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    model = out / "models" / "model.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, model)
    return [*files, model]
