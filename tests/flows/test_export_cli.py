"""`maskbank export`: the command line around train.export (formats, refusals, exit codes)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("dynamic_network_architectures")

from maskbank.flows.cli import main  # noqa: E402
from maskbank.train.incontext_net import build_model  # noqa: E402
from maskbank.train.run_config import TrainConfig  # noqa: E402


def _checkpoint(path, preset: str, ema: bool = True):
    torch.manual_seed(0)
    model = build_model(preset)
    payload = {"step": 2, "model": model.state_dict(), "config": TrainConfig.load(preset).to_dict()}
    if ema:
        payload["ema"] = {"decay": 0.9, "shadow": model.state_dict()}
    torch.save(payload, path)
    return str(path)


def test_export_writes_each_format(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "resenc.pt", "resenc-tiny")
    for fmt, marker in (("nnunet", "checkpoint_final.pth"), ("hf", "README.md"),
                        ("monai", "configs/metadata.json")):  # fmt: skip
        out = tmp_path / fmt
        assert main(["export", "--checkpoint", ckpt, "--format", fmt, "--out", str(out)]) == 0
        assert (out / marker).is_file()
        said = capsys.readouterr().out
        assert f"as {fmt} to {out}" in said and "self-test passed" in said
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["maskbank"]["encoder"] == "resenc"
    # The card says what it could not know rather than guessing (no bank recorded).
    assert "not recorded" in (tmp_path / "hf" / "README.md").read_text()


def test_export_refusals_exit_2_with_the_reason(tmp_path, capsys):
    iris = _checkpoint(tmp_path / "iris.pt", "tiny")
    assert (
        main(["export", "--checkpoint", iris, "--format", "nnunet", "--out", str(tmp_path / "a")])
        == 2
    )  # noqa: E501
    err = capsys.readouterr().err
    assert "maskbank export: error:" in err and "'iris' encoder" in err
    assert "--config resenc-l" in err and "--config resenc-tiny" in err
    noema = _checkpoint(tmp_path / "noema.pt", "resenc-tiny", ema=False)
    assert (
        main(["export", "--checkpoint", noema, "--format", "hf", "--out", str(tmp_path / "b")]) == 2
    )  # noqa: E501
    assert "no EMA weights" in capsys.readouterr().err
    assert (
        main(["export", "--checkpoint", noema, "--format", "onnx", "--out", str(tmp_path / "c")])
        == 2
    )  # noqa: E501
    assert (
        "unknown export format 'onnx'; choose one of nnunet, monai, hf" in capsys.readouterr().err
    )
    missing = str(tmp_path / "nope")
    assert (
        main(["export", "--checkpoint", missing, "--format", "hf", "--out", str(tmp_path / "d")])
        == 2
    )  # noqa: E501
    assert "does not exist" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcd")
