"""Checkpoints that let a preempted run continue exactly.

A checkpoint holds everything the next step depends on: model, EMA, optimiser,
scheduler, step, sampler state (the stream position), RNG states, the bank
fingerprint and the resolved config. Files are written once to a temporary name,
fsync'd and renamed (the directory fsync'd too), and ``last.pt`` is then a hard link to
the new file (a relative symlink where hard links are refused), so a kill or a power cut
during saving never leaves a truncated ``last.pt`` and no checkpoint is written twice.
Weights that are not finite are refused: such a checkpoint would make every resume fail.

Every piece of state is a tensor or a plain type (RNG states included), so that
checkpoints load with ``torch.load(weights_only=True)``: unpickling a checkpoint
somebody else wrote can never run code.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskbank.train.run_config import TrainConfig

LAST = "last.pt"
CHECKPOINTS = "checkpoints"  # a run folder's checkpoints, LAST among them


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


def _fsync_dir(directory: Path) -> None:
    """Make renames and links in ``directory`` durable (they live in the directory entry)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def non_finite_tensors(state: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of floating-point tensors in a (nested) state dict holding NaN or inf."""
    bad = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            bad += non_finite_tensors(value, name + ".")
        elif (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ):
            bad.append(name)
    return bad


def _point_last_at(path: Path) -> None:
    """Atomically make ``last.pt`` the same file as ``path`` without writing it again."""
    tmp = path.parent / f".{LAST}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # a filesystem without hard links
        os.symlink(path.name, tmp)
    os.replace(tmp, path.parent / LAST)


_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def prune_checkpoints(directory: str | Path, step: int, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``step_*.pt`` up to ``step`` (0 = keep all).

    Files of later steps (left by an earlier run when this one resumed from an older
    checkpoint) are another timeline: they are neither counted nor deleted.
    """
    if keep_last <= 0:
        return []
    steps = sorted(
        (int(m.group(1)), p)
        for p in Path(directory).iterdir()
        if (m := _STEP_FILE.match(p.name)) and int(m.group(1)) <= step
    )
    removed = [p for _, p in steps[:-keep_last]]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


DIGEST_KEY = "content_sha256"


def content_digest(value: Any, h: Any = None) -> str:
    """SHA-256 over a payload's structure and every tensor's bytes, in a fixed order.

    ``torch.load`` does not check the zip's CRCs, so a flipped bit inside the weights
    would load silently; the digest written with a checkpoint catches it (about 1 s per
    GB of state to compute).
    """
    top = h is None
    h = hashlib.sha256() if top else h
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            content_digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            content_digest(item, h)
    else:
        h.update(repr(value).encode())
    return h.hexdigest() if top else ""


def save_checkpoint(
    directory: str | Path, step: int, payload: dict[str, Any], keep_last: int = 0
) -> Path:
    """Write ``step_XXXXXXXX.pt`` once, durably, point ``last.pt`` at it, keep the last N.

    Raises ``CheckpointError`` (and writes nothing) when the model or EMA weights hold NaN
    or inf.
    """
    bad = non_finite_tensors({k: payload[k] for k in ("model", "ema") if k in payload})
    if bad:
        raise CheckpointError(
            f"refusing to write the step-{step} checkpoint: non-finite values in "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the last checkpoint "
            "is kept, resume from it (with a lower optim.lr)"
        )
    payload = {k: v for k, v in payload.items() if k != DIGEST_KEY}
    payload[DIGEST_KEY] = content_digest(payload)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    tmp = directory / f".{path.name}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _point_last_at(path)
    _fsync_dir(directory)
    prune_checkpoints(directory, step, keep_last)
    return path


class NoCheckpoint(FileNotFoundError):
    """Nothing to load at ``location``: a folder without ``last.pt`` (``folder``), or no file.

    Each command words it for its users (what to give instead); the fact is the same.
    """

    def __init__(self, location: Path, folder: bool) -> None:
        self.location, self.folder = location, folder
        super().__init__(
            f"no checkpoint in {location}: expected {LAST} or {CHECKPOINTS}/{LAST}"
            if folder
            else f"checkpoint {location} does not exist"
        )


def resolve_checkpoint(location: str | Path) -> Path:
    """A checkpoint file, a run folder (its ``checkpoints/last.pt``) or that checkpoints
    folder -> the checkpoint file; ``NoCheckpoint`` when there is none.

    The one rule for "a run or a checkpoint", so that resuming, evaluation, segmentation
    and export accept the same things.
    """
    path = Path(location).expanduser()
    if path.is_dir():
        for cand in (path / LAST, path / CHECKPOINTS / LAST):
            if cand.exists():
                return cand
        raise NoCheckpoint(path, folder=True)
    if not path.exists():
        raise NoCheckpoint(path, folder=False)
    return path


def find_checkpoint(resume: str | Path, out_dir: str | Path) -> Path:
    """``--resume`` given as a file, a run folder, or ``auto`` (this run's last.pt)."""
    auto = str(resume) in ("auto", "last", "")
    try:
        return resolve_checkpoint(Path(out_dir) / CHECKPOINTS / LAST if auto else resume)
    except NoCheckpoint as exc:
        raise FileNotFoundError(f"no checkpoint to resume from at {exc.location}") from exc


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
    recorded = payload.pop(DIGEST_KEY, None)
    if recorded is not None and recorded != content_digest(payload):
        raise CheckpointError(
            f"{path} is corrupt: its contents do not match the checksum written with it "
            "(flipped bits or a partial copy); resume from an older checkpoint with "
            "--resume-from CKPT"
        )
    return payload


# What a resumed run must share with its checkpoint: the stream position and the optimiser
# state only mean the same thing with these (``train.max_steps`` may grow).
RESUME_KEYS = (
    ("pretext", "incontext"),  # checkpoints from before pretexts existed were all in-context
    ("model.preset", None),
    ("data.batch_size", None),
    ("data.k", None),
    ("data.crop", None),
    ("data.proposals", "default"),  # another set is another stream (older runs drew 'default')
)


def _lookup(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def resume_mismatches(
    ckpt: dict[str, Any], cfg: TrainConfig | Mapping[str, Any], world_size: int
) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, this run's value)`` for each setting that differs.

    The checkpoint's config is the plain dict it was saved as. Keys a checkpoint does not
    record (older checkpoints) are not compared, except the pretext, which defaults to
    ``incontext``.
    """
    cfg = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
    ck_cfg = ckpt.get("config") or {}
    out = []
    for key, default in RESUME_KEYS:
        ours, theirs = _lookup(cfg, key), _lookup(ck_cfg, key)
        theirs = default if theirs is None else theirs
        if theirs is not None and theirs != ours:
            out.append((key, theirs, ours))
    if "world_size" in ckpt and int(ckpt["world_size"]) != world_size:
        out.append(("world_size", int(ckpt["world_size"]), world_size))
    return out


def check_resume(
    path: str | Path, ckpt: dict[str, Any], cfg: TrainConfig | Mapping[str, Any], world: int
) -> None:
    """Refuse to resume ``ckpt`` under an incompatible config, naming every difference."""
    diffs = resume_mismatches(ckpt, cfg, world)
    if diffs:
        theirs = " ".join(f"{k}={v}" for k, v, _ in diffs)
        ours = " ".join(f"{k}={v}" for k, _, v in diffs)
        hint = " ".join(f"{k}={v}" for k, v, _ in diffs if k != "world_size")
        ranks = [v for k, v, _ in diffs if k == "world_size"]
        how = []
        if hint:
            how.append(f"pass {hint}")
        if ranks:
            how.append(f"run on {ranks[0]} rank(s) (torchrun --nproc_per_node={ranks[0]})")
        raise CheckpointError(
            f"cannot resume {path}: it was written with {theirs}, this run has {ours}; "
            f"{' and '.join(how)} to continue it, or start a new --out"
        )
    step = int(ckpt.get("step", 0))
    max_steps = TrainConfig.coerce(cfg).train.max_steps
    if max_steps < step:
        raise CheckpointError(
            f"cannot resume {path}: it is at step {step}, past max_steps={max_steps}; "
            f"pass max_steps={step} or more"
        )
