"""Checkpoints hold only tensors and plain types; a planted pickle is refused, never run."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from maskbank.train.checkpointing import (
    CheckpointError,
    NoCheckpoint,
    check_resume,
    find_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    resume_mismatches,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from maskbank.train.run import main
from maskbank.train.run_config import TrainConfig, load_config


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


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_checkpoints_are_written_once_and_only_the_last_n_kept(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step, "model": {"w": torch.ones(2) * step}},
                        keep_last=2)  # fmt: skip
    assert _names(tmp_path) == ["last.pt", "step_00000003.pt", "step_00000004.pt"]
    # last.pt is the newest step file itself (a link), not a second copy.
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "step_00000004.pt")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    # A run resumed from an older checkpoint: the new file is kept however few are asked
    # for, and files of later steps (the abandoned run's) are neither counted nor deleted.
    save_checkpoint(tmp_path, 2, {"step": 2}, keep_last=1)
    assert _names(tmp_path) == [
        "last.pt", "step_00000002.pt", "step_00000003.pt", "step_00000004.pt"
    ]  # fmt: skip
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    save_checkpoint(tmp_path, 3, {"step": 3}, keep_last=1)
    assert _names(tmp_path) == ["last.pt", "step_00000003.pt", "step_00000004.pt"]
    # keep_last=0 keeps all.
    for step in (5, 6):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=0)
    assert len(list(tmp_path.glob("step_*.pt"))) == 4


def test_one_rule_finds_a_runs_checkpoint_and_each_command_words_a_miss(tmp_path):
    """A file, a run folder or its checkpoints/ resolve alike for resuming, evaluation and
    export; each says in its own words what is missing."""
    from maskbank.train.evaluation.checkpoint import load_network
    from maskbank.train.evaluation.errors import EvaluationError
    from maskbank.train.export.source import ExportError, checkpoint_file

    run = tmp_path / "run"
    last = save_checkpoint(run / "checkpoints", 1, {"step": 1}, keep_last=0).parent / "last.pt"
    for location in (run, run / "checkpoints", last, str(last)):
        assert resolve_checkpoint(location) == last
        assert checkpoint_file(location) == last
        assert find_checkpoint(location, tmp_path / "elsewhere") == last
    assert find_checkpoint("auto", run) == last

    empty, missing = tmp_path / "empty", tmp_path / "no.pt"
    empty.mkdir()
    with pytest.raises(NoCheckpoint, match="no checkpoint in .*checkpoints/last.pt") as info:
        resolve_checkpoint(empty)
    assert info.value.folder and isinstance(info.value, FileNotFoundError)
    with pytest.raises(NoCheckpoint, match="does not exist") as info:
        resolve_checkpoint(missing)
    assert not info.value.folder
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from at .*empty"):
        find_checkpoint("auto", empty)
    with pytest.raises(ExportError, match=r"no checkpoint in .*or give a \.pt file"):
        checkpoint_file(empty)
    with pytest.raises(ExportError, match="does not exist"):
        checkpoint_file(missing)
    with pytest.raises(EvaluationError, match="does not exist; .*'random' for the untrained"):
        load_network(str(missing))


def test_non_finite_weights_are_never_written(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1, "model": {"w": torch.ones(3)}})
    bad = {"step": 2, "model": {"w": torch.ones(3)}, "ema": {"shadow": {"w": torch.ones(3)}}}
    bad["ema"]["shadow"]["w"][1] = float("inf")
    with pytest.raises(CheckpointError, match=r"non-finite values in ema\.shadow\.w"):
        save_checkpoint(tmp_path, 2, bad)
    assert _names(tmp_path) == ["last.pt", "step_00000001.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1


def test_resume_mismatches_name_every_difference():
    cfg = load_config("tiny")
    ckpt = {"step": 4, "world_size": 2, "config": load_config("tiny", ["data.crop=64"])}
    diffs = resume_mismatches(ckpt, cfg, world_size=1)
    assert diffs == [("data.crop", 64, 32), ("world_size", 2, 1)]
    with pytest.raises(CheckpointError, match="torchrun --nproc_per_node=2") as info:
        check_resume("ck.pt", ckpt, cfg, 1)
    assert "data.crop=64 world_size=2" in str(info.value) and "pass data.crop=64" in str(info.value)
    # A checkpoint from before pretexts were recorded was in-context.
    old = {"step": 1, "config": {"model": {"preset": "tiny"}}}
    assert resume_mismatches(old, cfg, 1) == []
    recon = load_config("tiny", ["pretext=reconstruction"])
    assert resume_mismatches(old, recon, 1) == [("pretext", "incontext", "reconstruction")]
    check_resume("ck.pt", ckpt, load_config("tiny", ["data.crop=64", "max_steps=9"]), 2)


def test_flipped_bits_in_the_weights_are_caught(tmp_path):
    """torch.load does not check the zip's CRCs; the digest written with the file does."""
    weights = torch.full((256,), 1.2345)
    save_checkpoint(tmp_path, 3, {"step": 3, "model": {"w": weights}})
    path = tmp_path / "step_00000003.pt"
    assert torch.equal(load_checkpoint(path)["model"]["w"], weights)
    data = bytearray(path.read_bytes())
    pattern = weights[:2].numpy().tobytes()
    at = bytes(data).index(pattern)
    data[at : at + 4] = torch.tensor([9.0]).numpy().tobytes()  # one float changed in place
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_checkpoint(bad)


def test_the_typed_config_is_checked_against_a_checkpoints_dict():
    ckpt = {"step": 4, "world_size": 1, "config": load_config("tiny", ["data.k=5"])}
    typed = TrainConfig.load("tiny")
    assert resume_mismatches(ckpt, typed, 1) == [("data.k", 5, typed.data.k)]
    with pytest.raises(CheckpointError, match="past max_steps=3"):
        check_resume("ck.pt", {"step": 4}, TrainConfig.load("tiny", ["max_steps=3"]), 1)


def test_a_checkpoint_with_an_older_config_dict_resumes(phantom_bank, tmp_path):
    """Checkpoints keep the config as a plain dict; one written before keys were added (no
    pretext, reconstruction or debug_nan; ints where floats are now) still resumes."""
    quick = ["train.progress=false", "train.tensorboard=false", "train.ckpt_every=2"]
    first = tmp_path / "first"
    assert main(["--bank", phantom_bank, "--out", str(first), *quick, "max_steps=2"]) == 0
    state = load_checkpoint(first / "checkpoints" / "last.pt")
    assert state["config"] == TrainConfig.load("tiny", [*quick, "max_steps=2"]).to_dict()
    older = {k: v for k, v in state["config"].items() if k not in ("pretext", "reconstruction")}
    older["train"] = {k: v for k, v in older["train"].items() if k != "debug_nan"}
    older["data"] = {**older["data"], "worker_timeout": 600}
    save_checkpoint(tmp_path / "older", 2, {**state, "config": older})
    older_ckpt = str(tmp_path / "older" / "last.pt")
    argv = ["--bank", phantom_bank, "--out", str(tmp_path / "resumed"), "--resume-from"]
    assert main([*argv, older_ckpt, *quick, "max_steps=3"]) == 0
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert resumed["step"] == 3 and resumed["config"]["pretext"] == "incontext"
