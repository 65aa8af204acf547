"""`train.export`: a resenc-tiny pretraining on the phantom bank, exported and reloaded the way
nnU-Net and MONAI would, plus the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("dynamic_network_architectures")

from maskbank.train.export import ExportError, export_checkpoint  # noqa: E402
from maskbank.train.incontext_net import build_model  # noqa: E402
from maskbank.train.run import main as pretrain  # noqa: E402
from maskbank.train.run_config import TrainConfig  # noqa: E402

QUICK = ["train.progress=false", "train.tensorboard=false", "train.image_every=100"]


@pytest.fixture(scope="module")
def resenc_run(phantom_bank, tmp_path_factory) -> Path:
    """A real resenc-tiny pretraining: 3 CPU steps, EMA on, checkpoint at the end."""
    out = tmp_path_factory.mktemp("resenc") / "run"
    args = ["--config", "resenc-tiny", "--bank", phantom_bank, "--out", str(out), *QUICK]
    assert pretrain([*args, "max_steps=3", "train.ckpt_every=3"]) == 0
    return out


def _ema_encoder(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return {k: v for k, v in ckpt["ema"]["shadow"].items() if k.startswith("encoder.")}


def _import(path: str | None):
    if path is None:
        return None
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _build_from_plan(plan: dict, num_classes: int = 2) -> torch.nn.Module:
    """What nnU-Net does with an adaptation plan, written out independently of maskbank."""
    arch = plan["architecture_plans"]
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["arch_kwargs_requiring_import"]:
        kwargs[key] = _import(kwargs[key])
    cls = _import(arch["arch_class_name"])
    return cls(
        input_channels=plan["pretrain_num_input_channels"], num_classes=num_classes, **kwargs
    )


def test_nnunet_export_holds_the_pretrained_encoder(resenc_run, tmp_path):
    out = tmp_path / "nnunet"
    result = export_checkpoint(resenc_run, "nnunet", out)
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint_final.pth", "adaptation_plan.json", "config.json", "README.md"} <= names
    assert "plans_architecture.json" in names and result.self_test["strict_load"]
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert {"network_weights", "nnssl_adaptation_plan", "citations"} <= set(ckpt)
    plan = ckpt["nnssl_adaptation_plan"]
    assert plan == json.loads((out / "adaptation_plan.json").read_text())
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
    assert plan["keys_to_in_proj"][0] == "encoder.stem.convs.0.conv"
    assert plan["key_to_lpe"] is None and plan["pretrain_num_input_channels"] == 1
    assert plan["recommended_downstream_patchsize"] == [32, 32, 32]
    conf = plan["pretrain_plan"]["configurations"]["maskbank"]
    assert conf["patch_size"] == [32, 32, 32] and conf["spacing"] == [1.5, 1.5, 1.5]
    assert conf["normalization_schemes"] == ["ZScoreNormalization"]
    assert plan["architecture_plans"]["arch_class_name"].endswith("ResidualEncoderUNet")
    # Rebuild as nnU-Net would, load strictly: the encoder is the EMA one, bit for bit.
    net = _build_from_plan(plan)
    net.load_state_dict(ckpt["network_weights"], strict=True)
    state = net.state_dict()
    for key, value in _ema_encoder(resenc_run).items():
        assert torch.equal(state[key], value.float()), key
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    # The -pretrained_weights route: the plans block builds the same network.
    arch = json.loads((out / "plans_architecture.json").read_text())["architecture"]
    assert arch["arch_kwargs"] == plan["architecture_plans"]["arch_kwargs"]


def test_model_card_records_the_mask_source_and_results(resenc_run, tmp_path):
    results = tmp_path / "eval"
    results.mkdir()
    (results / "results.json").write_text(
        json.dumps(
            {
                "evaluation": "finetune",
                "headline": "mean test Dice",
                "networks": [
                    {"name": "run@3", "mean_dice": 0.61, "mean_dice_ci": [0.5, 0.7]},
                    {"name": "scratch", "mean_dice": 0.42},
                ],
                "baselines": {"scratch": {}},
            }
        )
    )
    out = tmp_path / "hf"
    export_checkpoint(resenc_run, "hf", out, results=[str(results)], license_id="cc-by-4.0")
    assert {p.name for p in out.iterdir()} == {
        "checkpoint_final.pth",
        "adaptation_plan.json",
        "config.json",
        "README.md",
    }
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["license"] == "cc-by-4.0" and header["pipeline_tag"] == "image-segmentation"
    assert "nnunet" in header["tags"]
    ckpt = torch.load(resenc_run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["bank_fingerprint"] in text
    assert "proposal set: `default`" in text and "per modality" in text
    assert "'ct': 1" in text and "phantom" in text  # scans per modality and dataset
    assert "0.61" in text and "scratch" in text  # results with their baseline
    assert "z-score" in text and "clips CT" in text  # the normalisation limit
    assert "max_steps: 3" in text  # the pretraining config
    config = json.loads((out / "config.json").read_text())
    assert config["maskbank"]["preset"] == "resenc-tiny" and config["maskbank"]["step"] == 3


def test_monai_bundle_loads_and_fine_tunes(resenc_run, tmp_path):
    from monai.bundle import ConfigParser, verify_net_in_out
    from monai.networks.utils import copy_model_state

    out = tmp_path / "bundle"
    export_checkpoint(resenc_run, "monai", out)
    for rel in ("configs/metadata.json", "configs/train.json", "configs/inference.json",
                "models/model.pt", "docs/README.md", "LICENSE"):  # fmt: skip
        assert (out / rel).is_file(), rel
    infer = ConfigParser()
    infer.read_config(str(out / "configs" / "inference.json"))
    infer["bundle_root"] = str(out)
    infer["device"] = "$torch.device('cpu')"
    net = infer.get_parsed_content("network")
    infer.get_parsed_content("load_weights")  # strict load of models/model.pt
    state = net.state_dict()
    for key, value in _ema_encoder(resenc_run).items():
        assert torch.equal(state[key], value.float()), key
    assert infer.get_parsed_content("inferer") is not None
    # Fine-tuning on a 3-class task: every weight but the head comes from the bundle.
    train = ConfigParser()
    train.read_config(str(out / "configs" / "train.json"))
    train["bundle_root"] = str(out)
    train["device"] = "$torch.device('cpu')"
    train["num_classes"] = 3
    tnet = train.get_parsed_content("network")
    _, loaded, skipped = train.get_parsed_content("load_pretrained")
    assert any("seg_layers" in k for k in skipped) and "encoder.stem.convs.0.conv.weight" in loaded
    assert torch.equal(tnet.state_dict()["encoder.stem.convs.0.conv.weight"],
                       state["encoder.stem.convs.0.conv.weight"])  # fmt: skip
    copy_model_state(tnet, net, exclude_vars=r"decoder\.seg_layers\..*")
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(out / "configs" / "metadata.json"),
        config_file=str(out / "configs" / "inference.json"),
        device="cpu",
        n=2,
        bundle_root=str(out),
    )


def _fake_checkpoint(path: Path, preset: str, ema: bool) -> Path:
    torch.manual_seed(0)
    model = build_model(preset)
    cfg = TrainConfig.load(preset).to_dict()
    payload = {"step": 1, "model": model.state_dict(), "config": cfg}
    if ema:
        payload["ema"] = {"decay": 0.9, "shadow": model.state_dict()}
    torch.save(payload, path)
    return path


def test_refusals_say_why_and_what_to_do(tmp_path):
    iris = _fake_checkpoint(tmp_path / "iris.pt", "tiny", ema=True)
    with pytest.raises(ExportError, match=r"(?s)matches no nnU-Net.*--config resenc-l"):
        export_checkpoint(iris, "nnunet", tmp_path / "a")
    res = _fake_checkpoint(tmp_path / "noema.pt", "resenc-tiny", ema=False)
    with pytest.raises(ExportError, match="no EMA weights.*--weights model"):
        export_checkpoint(res, "nnunet", tmp_path / "b")
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export_checkpoint(res, "onnx", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    done = export_checkpoint(res, "nnunet", tmp_path / "d", weights="model")
    assert done.encoder.weights == "model"
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(res, "nnunet", tmp_path / "d", weights="model")
    with pytest.raises(ExportError, match="cannot read"):
        export_checkpoint(res, "hf", tmp_path / "e", weights="model", results=[str(tmp_path)])


def test_nnunetv2_load_pretrained_weights_takes_every_non_head_key(resenc_run, tmp_path):
    """The released nnU-Net's -pretrained_weights loader on a network from a plans file."""
    loader = pytest.importorskip("nnunetv2.run.load_pretrained_weights")
    out = tmp_path / "nnunet"
    export_checkpoint(resenc_run, "nnunet", out)
    arch = json.loads((out / "plans_architecture.json").read_text())["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        kwargs[key] = _import(kwargs[key])
    net = _import(arch["network_class_name"])(input_channels=1, num_classes=4, **kwargs)
    loader.load_pretrained_weights(net, str(out / "checkpoint_final.pth"), verbose=False)
    state = net.state_dict()
    for key, value in _ema_encoder(resenc_run).items():
        assert torch.equal(state[key], value.float()), key


def test_evaluation_loads_the_resenc_checkpoint(resenc_run):
    """Evaluation (incontext, finetune, probe, segment) rebuilds the network from the preset."""
    from maskbank.train.evaluation.checkpoint import load_network

    net = load_network(str(resenc_run))
    assert net.preset == "resenc-tiny" and net.weights == "ema"
    state = net.model.state_dict()
    for key, value in _ema_encoder(resenc_run).items():
        assert torch.equal(state[key], value.float()), key
    x = torch.randn(1, 1, 32, 32, 32)
    tasks = net.model.encode_tasks(x, (x > 0).float()[:, :1].expand(1, 2, -1, -1, -1))
    assert net.model.segment(x, tasks).shape == (1, 2, 32, 32, 32)
    scratch = load_network("scratch", net.preset)  # the fine-tuning baseline: same network
    assert set(scratch.model.state_dict()) == set(state)
