"""Checkpoints that let a preempted run continue exactly.

A checkpoint holds everything the next step depends on: model, EMA, optimiser,
scheduler, step, sampler state (the stream position), RNG states, the bank
fingerprint and the resolved config. Files are written to a temporary name and
renamed, so a kill during saving never leaves a truncated ``last.pt``.

Every piece of state is a tensor or a plain type (RNG states included), so that
checkpoints load with ``torch.load(weights_only=True)``: unpickling a checkpoint
somebody else wrote can never run code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAST = "last.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or of another kind."""


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    state = {
        "python": random.getstate(),  # (version, tuple of ints, float | None)
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002 (libraries may use the global RNG)
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
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
    """Load a checkpoint without unpickling code (``weights_only=True``).

    A file that needs arbitrary unpickling (a planted or foreign pickle) is refused
    with a ``CheckpointError`` instead of being executed.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError, a truncated zip, ...
        raise CheckpointError(
            f"refusing to load {path}: it is not a checkpoint that loads with "
            f"weights_only=True (tensors and plain types only): {str(exc).splitlines()[0]}"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint dict")
    return payload
