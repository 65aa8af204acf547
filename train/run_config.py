"""Training configuration: YAML presets + dotted ``key=value`` overrides.

A config is a plain nested ``dict`` so that it round-trips through YAML and
checkpoints without custom classes. ``DEFAULTS`` lists every key; a preset file
only needs the keys it changes, and an override may only set a key that exists
(typos fail loudly instead of being silently ignored).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    # What the network learns from each pair: incontext (segment the reference's masks in
    # the query) or reconstruction (restore masked blocks; the same-budget baseline).
    "pretext": "incontext",
    "model": {"preset": "tiny"},
    "data": {
        "crop": 128,  # edge of the cubic crop the network sees
        "margin": 16,  # extra voxels read per side so the affine warp has context
        "min_overlap": 2 / 3,  # reference/query overlap per axis, as a fraction of crop
        "k": 13,  # proposals per pair (a global all-ones task is added on top)
        "min_mask_voxels": 64,  # a proposal must have this many voxels inside the reference crop
        "dataset_weights": {},  # dataset name -> sampling weight (default 1)
        "modality_weights": {},  # modality -> sampling weight (default 1)
        "batch_size": 2,
        "num_workers": 0,
        "prefetch_factor": 4,
        # Seconds the trainer waits for a DataLoader worker's next batch before it stops with
        # an error naming the hung worker (num_workers > 0 only; 0 = wait forever).
        "worker_timeout": 600,
        "scans": None,  # optional list of scan ids to restrict to
    },
    "augment": {"enabled": True, "device": "auto"},
    "reconstruction": {  # used by pretext=reconstruction only
        "block": None,  # edge of the zeroed cubes in voxels; None = data.crop // 4
        "mask_ratio": 0.6,  # fraction of the blocks zeroed per crop
    },
    "optim": {
        "name": "adamw",  # adamw | lamb
        "lr": 1e-3,
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "warmup_frac": 0.1,  # one-cycle warm-up fraction of max_steps
        "grad_clip": 1.0,
    },
    "train": {
        "max_steps": 100,
        "ema_decay": 0.999,
        "bf16": True,  # autocast on CUDA only; CPU always runs fp32
        "compile": False,
        "log_every": 1,
        "image_every": 50,
        "ckpt_every": 50,
        "progress": True,
        "tensorboard": True,
        # A step whose loss or gradients are not finite is skipped on every rank (counted in
        # metrics.jsonl as skipped_steps); this many in a row stop the run (exit 2; 0 = never).
        "max_skipped_steps": 20,
        "keep_last": 3,  # step_*.pt checkpoints kept (last.pt links the newest); 0 = all
        # Tests only: make this run's loss ("loss") or gradients after DDP's averaging ("grad")
        # NaN at these 1-based steps on these ranks (None = all), to exercise the skipping.
        "debug_nan": {"steps": [], "ranks": None, "target": "grad"},
    },
}


def deep_merge(base: dict[str, Any], update: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Return ``base`` updated recursively by ``update``; unknown keys are errors."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in out:
            raise KeyError(f"unknown config key '{where}'")
        if isinstance(out[key], dict) and isinstance(value, dict) and out[key]:
            out[key] = deep_merge(out[key], value, where + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=5"`` -> (["train", "max_steps"], 5); values are parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


# Short aliases the issue promises (``max_steps=N``) besides fully dotted keys.
ALIASES = {
    "max_steps": "train.max_steps",
    "batch_size": "data.batch_size",
    "preset": "model.preset",
}


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides in order; each must name an existing key."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] in ALIASES:
            keys = ALIASES[keys[0]].split(".")
        node = cfg
        for i, key in enumerate(keys[:-1]):
            if key not in node or not isinstance(node[key], dict):
                raise KeyError(f"unknown config key '{'.'.join(keys[: i + 1])}' in '{text}'")
            node = node[key]
        leaf = keys[-1]
        # Weight tables are free-form (dataset names are data); everything else must exist.
        free_form = len(keys) >= 2 and keys[-2].endswith("_weights")
        if leaf not in node and not free_form:
            raise KeyError(f"unknown config key '{'.'.join(keys)}' in '{text}'")
        node[leaf] = value
    return cfg


def resolve_config_path(name_or_path: str | Path) -> Path:
    """Accept a path or a preset name (``tiny`` -> train/configs/tiny.yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    raise FileNotFoundError(
        f"config '{name_or_path}' is neither a file nor a preset in {CONFIG_DIR}"
    )


def load_config(name_or_path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """DEFAULTS <- YAML file (if any) <- overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if name_or_path is not None:
        with open(resolve_config_path(name_or_path)) as fh:
            cfg = deep_merge(cfg, yaml.safe_load(fh) or {})
    return apply_overrides(cfg, list(overrides))


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
