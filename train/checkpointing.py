"""Checkpoints that let a preempted run continue exactly.

A checkpoint holds everything the next step depends on: model, EMA, optimiser,
scheduler, step, sampler state (the stream position), RNG states, the bank
fingerprint and the resolved config. Files are written to a temporary name and
renamed, so a kill during saving never leaves a truncated ``last.pt``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAST = "last.pt"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (libraries may use the global RNG)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, step: int, payload: dict[str, Any]) -> Path:
    """Write ``step_XXXXXXXX.pt`` and point ``last.pt`` at the same content atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    tmp = directory / f".{path.name}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    tmp_last = directory / f".{LAST}.tmp"
    torch.save(payload, tmp_last)
    os.replace(tmp_last, directory / LAST)
    return path


def find_checkpoint(resume: str | Path, out_dir: str | Path) -> Path:
    """``--resume`` given as a file, a directory, or ``auto`` (the run's last.pt)."""
    if str(resume) in ("auto", "last", ""):
        path = Path(out_dir) / "checkpoints" / LAST
    else:
        path = Path(resume)
        if path.is_dir():
            path = path / LAST if (path / LAST).exists() else path / "checkpoints" / LAST
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    # weights_only=False: the payload holds optimiser/RNG state objects we wrote ourselves.
    return torch.load(path, map_location="cpu", weights_only=False)
