"""Real checkpoints of untrained `tiny` networks and small CT phantoms saved as NIfTI."""

from __future__ import annotations

from pathlib import Path

import pytest

SHAPE = (48, 44, 36)
SPACING = (2.0, 2.0, 2.0)


def write_checkpoint(out: Path, seed: int, bank: str | None = None) -> Path:
    """An untrained `tiny` network written as `maskbank pretrain` writes its checkpoints."""
    import torch

    from maskbank.train.checkpointing import save_checkpoint
    from maskbank.train.incontext_net import build_model
    from maskbank.train.run_config import TrainConfig

    torch.manual_seed(seed)
    payload = {
        "model": build_model("tiny").state_dict(),
        "config": TrainConfig.load("tiny").to_dict(),
        "step": 0,
    }
    if bank is not None:
        payload["bank"] = bank
    save_checkpoint(out / "checkpoints", 0, payload)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("seg") / "run", seed=0)


@pytest.fixture(scope="session")
def other_run(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("seg") / "other", seed=1)


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Reference ``ref0``/``ref1`` and queries ``q0``/``q1`` (image, label) at 2 mm."""
    from maskbank.pipeline.phantom import make_phantom

    root = tmp_path_factory.mktemp("phantoms")
    out = {}
    for name, seed, folder in (("ref0", 0, "refs"), ("ref1", 1, "refs"), ("q0", 2, "queries")):
        ph = make_phantom("ct", shape=SHAPE, spacing=SPACING, seed=seed)
        out[name] = ph.save_nifti(root / folder, name)
    ph = make_phantom("ct", shape=(40, 48, 30), spacing=(2.5, 1.8, 2.4), seed=3)
    out["q1"] = ph.save_nifti(root / "queries", "q1")
    return out
