"""The resenc encoder: nnU-Net's ResidualEncoder under the in-context network, key for key."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("dynamic_network_architectures")

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet  # noqa: E402

from maskbank.train import resenc  # noqa: E402
from maskbank.train.incontext_net import PRESETS, build_model, count_parameters  # noqa: E402
from maskbank.train.pretext import PretextError, create_pretext  # noqa: E402
from maskbank.train.run_config import ConfigError, TrainConfig  # noqa: E402


def test_resenc_l_is_nnunets_resenc_l():
    spec = PRESETS["resenc-l"]
    kw = resenc.encoder_kwargs(spec)
    assert kw["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert kw["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert kw["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert kw["kernel_sizes"] == [[3, 3, 3]] * 6
    assert kw["norm_op"] is torch.nn.InstanceNorm3d and kw["norm_op_kwargs"]["affine"]
    assert kw["nonlin"] is torch.nn.LeakyReLU
    net = build_model("resenc-l")
    # The in-context network's encoder keys are the ResidualEncoderUNet's, shape for shape.
    unet = ResidualEncoderUNet(**resenc.unet_kwargs(spec))
    ours = {k: v.shape for k, v in net.state_dict().items() if k.startswith("encoder.")}
    theirs = {k: v.shape for k, v in unet.state_dict().items() if k.startswith("encoder.")}
    assert ours == theirs
    assert any(k.startswith("encoder.stem.") for k in ours)
    assert 80e6 < count_parameters(net.encoder) < 120e6


def test_resenc_tiny_pyramid_matches_iris_and_runs():
    torch.manual_seed(0)
    iris, res = build_model("tiny"), build_model("resenc-tiny")
    x = torch.randn(1, 1, 32, 32, 32)
    a, b = iris.encoder(x), res.encoder(x)
    assert [t.shape for t in a] == [t.shape for t in b]
    masks = (torch.rand(1, 3, 32, 32, 32) > 0.5).float()
    logits = res(x, masks, x)
    assert logits.shape == (1, 3, 32, 32, 32) and torch.isfinite(logits).all()
    logits.float().mean().backward()
    assert res.encoder.stem.convs[0].conv.weight.grad is not None


def test_model_encoder_key_is_checked_against_the_preset():
    cfg = TrainConfig.load("resenc-tiny")
    assert cfg.model.encoder == "resenc" and cfg.model.preset == "resenc-tiny"
    assert TrainConfig.load("tiny").model.encoder == "iris"
    with pytest.raises(ConfigError, match="model.encoder='unet'"):
        TrainConfig.load("tiny", ["model.encoder=unet"])
    bad = TrainConfig.load("tiny", ["model.encoder=resenc"])
    with pytest.raises(PretextError, match="resenc-tiny"):
        create_pretext("incontext", bad).build_model(bad.model.preset)
    # The reconstruction baseline trains the same encoder (same keys) for a fair comparison.
    rec = TrainConfig.load("resenc-tiny", ["pretext=reconstruction"])
    net = create_pretext("reconstruction", rec).build_model(rec.model.preset)
    assert any(k.startswith("encoder.stem.") for k in net.state_dict())


def test_plans_block_rebuilds_the_same_network():
    spec = PRESETS["resenc-tiny"]
    arch = resenc.plans_arch_kwargs(spec)
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    assert arch["arch_kwargs"]["conv_op"] == "torch.nn.modules.conv.Conv3d"
    net = resenc.build_unet(
        arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3, arch["network_class_name"]
    )
    ref = ResidualEncoderUNet(**resenc.unet_kwargs(spec, num_classes=3))
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
