"""Which weights an evaluation runs: EMA, another pretext's encoder, or a clear refusal."""

from __future__ import annotations

import pytest
import torch

from maskbank.train.checkpointing import load_checkpoint
from maskbank.train.evaluation.checkpoint import load_network
from maskbank.train.evaluation.errors import EvaluationError
from maskbank.train.run import main as train_main


def test_ema_weights_are_evaluated(tiny_checkpoint):
    net = load_network(str(tiny_checkpoint))
    payload = load_checkpoint(tiny_checkpoint)
    for name, value in net.model.state_dict().items():
        assert torch.equal(value, payload["ema"]["shadow"][name].to(value.dtype)), name
    assert net.preset == "tiny" and net.crop == 32 and net.pretext == "incontext"
    assert net.label == f"{tiny_checkpoint.parent.parent.name}@{payload['step']}"


def test_a_reconstruction_checkpoint_brings_its_encoder(phantom_bank, tmp_path):
    out = tmp_path / "recon"
    argv = ["--config", "tiny", "--bank", phantom_bank, "--out", str(out)]
    assert train_main([*argv, "pretext=reconstruction", "train.max_steps=2"]) == 0
    net = load_network(str(out))
    assert net.weights == "encoder" and net.pretext == "reconstruction"
    shadow = load_checkpoint(out / "checkpoints" / "last.pt")["ema"]["shadow"]
    floor = load_network("random", "tiny").model.state_dict()
    for name, value in net.model.state_dict().items():
        if name.startswith("encoder."):
            assert torch.equal(value, shadow[name]), name
        else:  # the rest of the in-context network stays at the seeded untrained weights
            assert torch.equal(value, floor[name]), name


def test_foreign_files_are_refused(tmp_path):
    weights_only = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, weights_only)
    with pytest.raises(EvaluationError, match="not a maskbank pretraining checkpoint"):
        load_network(str(weights_only))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights_only.read_bytes()[:40])
    with pytest.raises(EvaluationError, match="refusing to load"):
        load_network(str(truncated))
    with pytest.raises(EvaluationError, match="no checkpoint in"):
        load_network(str(tmp_path))
    with pytest.raises(EvaluationError, match="unknown preset"):
        load_network("random", "huge")
