"""Checkpoints hold only tensors and plain types; a planted pickle is refused, never run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from train.checkpointing import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.run import main


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002 (the global RNG is what the checkpoint restores)
    torch.manual_seed(3)
    np.random.normal()  # noqa: NPY002 (leaves a cached gaussian in the state)
    save_checkpoint(tmp_path, 7, {"step": 7, "rng": rng_state()})
    expected = (random.random(), np.random.random(), torch.rand(1))  # noqa: NPY002
    loaded = load_checkpoint(tmp_path / "last.pt")  # weights_only=True inside
    set_rng_state(loaded["rng"])
    again = (random.random(), np.random.random(), torch.rand(1))  # noqa: NPY002
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


class _Planted:
    def __reduce__(self):
        return (print, ("planted code ran",))


def test_a_planted_checkpoint_is_refused_on_resume(sparse_bank, tmp_path, capsys):
    planted = tmp_path / "planted.pt"
    torch.save({"step": 1, "model": _Planted()}, planted)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(planted)
    argv = ["--bank", sparse_bank, "--out", str(tmp_path / "run"), "--resume-from", str(planted)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "refusing to load" in captured.err and "planted code ran" not in captured.out
