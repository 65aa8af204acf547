"""Training configuration: typed, frozen, validated once when it is loaded.

``TrainConfig`` is built from its defaults, a YAML preset (train/configs/*.yaml, which
only lists the keys it changes) and dotted ``key=value`` overrides, in that order. Every
key must exist (a typo fails loudly, naming the closest valid key) and every value is
checked once here -- its type, its range, its choices -- so the trainer reads typed
attributes instead of converting a dict where each value is used. Names kept in a
registry (``pretext``: ``train.pretext.PRETEXTS``; ``model.preset``:
``train.incontext_net.PRESETS``) are checked by that registry, when the pretext is
created, so this module imports neither.

``to_dict()`` is the plain, JSON-able form written to ``config.yaml`` and into each
checkpoint; ``from_dict()`` reads it back (missing keys take their defaults).
``load_config`` returns that dict form, for readers that only look a value up.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
OPTIMIZERS = ("adamw", "lamb")
NAN_TARGETS = ("loss", "grad")  # what train.debug_nan makes non-finite

_S = TypeVar("_S", bound="_Section")


class ConfigError(ValueError):
    """A configuration that cannot be used (wrong type, value out of range, unknown choice)."""


class UnknownKeyError(ConfigError, KeyError):
    """A key the configuration does not have (also a ``KeyError``, as a missing key is)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _closest(key: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the valid key nearest to ``key``, or nothing."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown_key(dotted: str, valid: Iterable[str], context: str = "") -> UnknownKeyError:
    """The error for ``dotted``, naming the closest of ``valid`` (full dotted keys)."""
    prefix = dotted.rpartition(".")[0]
    full = [f"{prefix}.{k}" if prefix else k for k in valid]
    where = f" in '{context}'" if context else ""
    return UnknownKeyError(f"unknown config key '{dotted}'{where}{_closest(dotted, full)}")


# ---------------------------------------------------------------------------- coercion
def _coerce(where: str, value: Any, hint: Any) -> Any:
    """``value`` as the annotated type ``hint``; a value of another kind is a ConfigError."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or type(hint).__name__ == "UnionType":  # X | None
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(where, value, inner)
    if isinstance(hint, type) and issubclass(hint, _Section):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of its keys, got {value!r}")
        return hint.from_dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must hold {len(args)} values, got {list(value)!r}")
        return tuple(
            _coerce(f"{where}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(f"{where}.{k}", v, args[1]) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: no coercion for {hint!r}")  # a field this module cannot check


def _plain(value: Any) -> Any:
    """Tuples as lists, sections as dicts: the YAML/JSON form."""
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class _Section:
    """A frozen group of settings: values coerced to their annotated types, then checked."""

    PATH: ClassVar[str] = ""  # dotted prefix of this section's keys ("" = top level)

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = _coerce(self._key(f.name), getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self.validate()

    def _key(self, name: str) -> str:
        return f"{self.PATH}.{name}" if self.PATH else name

    def validate(self) -> None:
        """Ranges and choices (types are already checked)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls: type[_S], data: Mapping[str, Any]) -> _S:
        """Built from ``data``; keys it lacks keep their defaults, unknown keys are refused."""
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise unknown_key(f"{cls.PATH}.{key}" if cls.PATH else str(key), names)
        return cls(**dict(data))


@dataclass(frozen=True)
class ModelConfig(_Section):
    PATH: ClassVar[str] = "model"
    # Network size: a name in the preset registry (train.incontext_net.PRESETS), which
    # checks it when the pretext is created.
    preset: str = "tiny"
    # "iris" (max-pooling + basic blocks, the published encoder) or "resenc" (nnU-Net's
    # residual encoder, exportable to nnU-Net and MONAI): it must be the preset's own
    # (--config resenc-tiny / resenc-l), checked when the network is built.
    encoder: str = "iris"

    ENCODERS: ClassVar[tuple[str, ...]] = ("iris", "resenc")

    def validate(self) -> None:
        _require(
            self.encoder in self.ENCODERS,
            f"model.encoder={self.encoder!r}: choose one of {', '.join(self.ENCODERS)}",
        )


@dataclass(frozen=True)
class DataConfig(_Section):
    """What the pair stream draws (``train.pair_sampler.PairStream`` takes this section as
    it is) and how it is loaded."""

    PATH: ClassVar[str] = "data"
    MAX_K: ClassVar[int] = 23  # proposals + the global task fit the sampler's bit field
    SHORT_SCANS: ClassVar[tuple[str, ...]] = ("skip", "refuse")

    crop: int = 128  # edge of the cubic crop the network sees
    margin: int = 16  # extra voxels read per side so the affine warp has context
    min_overlap: float = 2 / 3  # reference/query overlap per axis, as a fraction of crop
    k: int = 13  # proposals per pair (a global all-ones task is added on top)
    min_mask_voxels: int = 64  # a proposal must have this many voxels inside the reference crop
    dataset_weights: dict[str, float] = field(default_factory=dict)  # name -> weight (default 1)
    modality_weights: dict[str, float] = field(default_factory=dict)  # modality -> weight
    batch_size: int = 2
    num_workers: int = 0
    prefetch_factor: int = 4
    # Seconds the trainer waits for a DataLoader worker's next batch before it stops with
    # an error naming the hung worker (num_workers > 0 only; 0 = wait forever).
    worker_timeout: float = 600.0
    scans: tuple[str, ...] | None = None  # optional list of scan ids to restrict to
    proposals: str = "default"  # the proposal set pairs are drawn from (`maskbank propose --name`)
    # Scans with fewer than k proposals (of data.proposals): "skip" leaves them out of the
    # stream (counted in a start-up warning), "refuse" stops with their list; listing every
    # other scan in data.scans is no option on a bank of 100k scans.
    short_scans: str = "skip"
    # "Not here": inference shows the network mostly windows where a structure is absent, so
    # the pretext must practise empty targets. Share of pairs whose query crop does not
    # overlap the reference (adjacent to it), and share of the K tasks drawn, in the other
    # pairs, among reference proposals whose box misses the query crop (as far as any do).
    disjoint_frac: float = 0.0
    absent_frac: float = 0.0
    # A reference mask filling the crop carries no boundary: proposals covering more than
    # this fraction of the reference crop, or whose box holds the whole crop, are drawn only
    # when fewer than K others are in view (1 = no preference).
    max_ref_fill: float = 1.0
    # Held-out pair validation: scans kept out of the stream and scored every
    # train.val_every steps; an explicit list, or a fraction of the scans (by id hash).
    val_scans: tuple[str, ...] | None = None
    val_fraction: float = 0.0
    # Anchors tried in a drawn scan before the sampler draws another (at most
    # MAX_SCANS_PER_PAIR scans per pair, then a SamplerError names what to change).
    max_anchor_tries: int = 20
    # P > 1: P consecutive pairs share a scan (its decoded chunks are reused; less scan
    # diversity per batch); 1 is the stream pair for pair.
    pairs_per_scan_visit: int = 1

    @property
    def read_size(self) -> int:
        """Edge of each crop as read: the crop plus ``margin`` voxels per side."""
        return self.crop + 2 * self.margin

    @property
    def n_tasks(self) -> int:
        """Tasks per pair: the K proposals and the global all-ones task."""
        return self.k + 1

    def validate(self) -> None:
        _require(
            isinstance(self.proposals, str)
            and re.fullmatch(r"[a-z0-9][a-z0-9_]{0,31}", self.proposals) is not None,
            f"data.proposals={self.proposals!r}: a proposal set name ([a-z0-9_], <= 32 chars)",
        )
        for name, low in (("crop", 1), ("margin", 0), ("k", 1), ("min_mask_voxels", 0)):
            _require(getattr(self, name) >= low, f"data.{name} must be >= {low}")
        for name, low in (
            ("batch_size", 1),
            ("num_workers", 0),
            ("prefetch_factor", 1),
            ("max_anchor_tries", 1),
            ("pairs_per_scan_visit", 1),
        ):
            _require(getattr(self, name) >= low, f"data.{name} must be >= {low}")
        _require(self.k <= self.MAX_K, f"data.k={self.k}: at most {self.MAX_K} proposals")
        _require(
            self.short_scans in self.SHORT_SCANS,
            f"data.short_scans={self.short_scans!r}: choose one of {', '.join(self.SHORT_SCANS)}",
        )
        _require(
            0 < self.min_overlap <= 1, f"data.min_overlap={self.min_overlap} must lie in (0, 1]"
        )
        _require(self.worker_timeout >= 0, "data.worker_timeout must be >= 0 (0 = forever)")
        for name in ("disjoint_frac", "absent_frac", "val_fraction"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"data.{name}={value} must lie in [0, 1]")
        _require(0 < self.max_ref_fill <= 1, f"data.max_ref_fill={self.max_ref_fill}: (0, 1]")
        _require(self.val_fraction < 1, "data.val_fraction must be < 1 (scans must remain)")
        for table in ("dataset_weights", "modality_weights"):
            for key, weight in getattr(self, table).items():
                _require(weight >= 0, f"data.{table}.{key}={weight} must be >= 0")


@dataclass(frozen=True)
class AugmentConfig(_Section):
    PATH: ClassVar[str] = "augment"
    enabled: bool = True
    device: str = "auto"  # where pairs are augmented: auto (the training device) or a device

    def validate(self) -> None:
        if self.device == "auto":
            return
        import torch

        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ConfigError(f"augment.device={self.device!r} is not a device: {exc}") from exc


@dataclass(frozen=True)
class ReconstructionConfig(_Section):
    """Used by ``pretext=reconstruction`` only."""

    PATH: ClassVar[str] = "reconstruction"
    block: int | None = None  # edge of the zeroed cubes in voxels; None = data.crop // 4
    mask_ratio: float = 0.6  # fraction of the blocks zeroed per crop

    def validate(self) -> None:
        _require(self.block is None or self.block >= 1, "reconstruction.block must be >= 1")
        _require(
            0 < self.mask_ratio < 1,
            f"reconstruction.mask_ratio={self.mask_ratio} must lie in (0, 1)",
        )


@dataclass(frozen=True)
class LossConfig(_Section):
    """Weights of the in-context loss: a region term on tasks present in the query and a
    voxel term on every task (the only one that can teach an empty target)."""

    PATH: ClassVar[str] = "loss"
    tversky_weight: float = 1.0  # adaptive Tversky, over tasks whose target is not empty
    bce_weight: float = 1.0  # binary cross-entropy (focal with focal_gamma > 0), all tasks
    focal_gamma: float = 0.0

    def validate(self) -> None:
        for name in ("tversky_weight", "bce_weight", "focal_gamma"):
            _require(getattr(self, name) >= 0, f"loss.{name} must be >= 0")
        _require(self.tversky_weight + self.bce_weight > 0, "loss: some weight must be > 0")


@dataclass(frozen=True)
class OptimConfig(_Section):
    PATH: ClassVar[str] = "optim"
    name: str = "adamw"  # adamw | lamb
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_frac: float = 0.1  # one-cycle warm-up fraction of max_steps
    grad_clip: float = 1.0

    def validate(self) -> None:
        object.__setattr__(self, "name", self.name.lower())
        _require(
            self.name in OPTIMIZERS,
            f"optim.name must be one of {list(OPTIMIZERS)}, got {self.name!r}",
        )
        _require(self.lr > 0 and math.isfinite(self.lr), f"optim.lr={self.lr} must be > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _require(all(0 <= b < 1 for b in self.betas), f"optim.betas={list(self.betas)}: [0, 1)")
        _require(0 <= self.warmup_frac <= 1, "optim.warmup_frac must lie in [0, 1]")
        _require(self.grad_clip > 0, "optim.grad_clip must be > 0")


@dataclass(frozen=True)
class DebugNanConfig(_Section):
    """Tests only: make this run's loss ("loss") or gradients after DDP's averaging
    ("grad") NaN at these 1-based steps on these ranks (None = all), to exercise skipping."""

    PATH: ClassVar[str] = "train.debug_nan"
    steps: tuple[int, ...] = ()
    ranks: tuple[int, ...] | None = None
    target: str = "grad"

    def __post_init__(self) -> None:
        if self.steps is None:  # "no steps", as an empty list
            object.__setattr__(self, "steps", ())
        super().__post_init__()

    def validate(self) -> None:
        _require(
            self.target in NAN_TARGETS,
            f"train.debug_nan.target must be one of {list(NAN_TARGETS)}, got {self.target!r}",
        )

    def applies_to(self, rank: int) -> frozenset[int]:
        """The 1-based steps made non-finite on ``rank``."""
        if self.ranks is not None and rank not in self.ranks:
            return frozenset()
        return frozenset(self.steps)


@dataclass(frozen=True)
class TrainLoopConfig(_Section):
    PATH: ClassVar[str] = "train"
    max_steps: int = 100
    ema_decay: float = 0.999
    bf16: bool = True  # autocast on CUDA only; CPU always runs fp32
    compile: bool = False
    log_every: int = 1
    image_every: int = 50
    ckpt_every: int = 50
    progress: bool = True
    tensorboard: bool = True
    # A step whose loss or gradients are not finite is skipped on every rank (counted in
    # metrics.jsonl as skipped_steps); this many in a row stop the run (exit 2; 0 = never).
    max_skipped_steps: int = 20
    keep_last: int = 3  # step_*.pt checkpoints kept (last.pt links the newest); 0 = all
    val_every: int = 100  # held-out pair validation every this many steps (and at the end)
    val_pairs: int = 32  # fixed pairs scored at each validation
    debug_nan: DebugNanConfig = field(default_factory=DebugNanConfig)

    def validate(self) -> None:
        _require(self.max_steps >= 0, "train.max_steps must be >= 0")
        _require(0 <= self.ema_decay <= 1, "train.ema_decay must lie in [0, 1]")
        for name in ("log_every", "image_every", "ckpt_every"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1")
        _require(self.max_skipped_steps >= 0, "train.max_skipped_steps must be >= 0 (0 = never)")
        _require(self.keep_last >= 0, "train.keep_last must be >= 0 (0 = all)")
        _require(self.val_every >= 1, "train.val_every must be >= 1")
        _require(self.val_pairs >= 1, "train.val_pairs must be >= 1")


@dataclass(frozen=True)
class TrainConfig(_Section):
    """A whole training run's settings; ``to_dict()`` is what config.yaml and checkpoints keep."""

    seed: int = 0
    # What the network learns from each pair: incontext (segment the reference's masks in
    # the query) or reconstruction (restore masked blocks; the same-budget baseline). A name
    # in the pretext registry (train.pretext.PRETEXTS), which checks it.
    pretext: str = "incontext"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)

    def validate(self) -> None:
        _require(self.seed >= 0, "seed must be >= 0")
        block = self.reconstruction.block
        _require(
            block is None or block <= self.data.crop,
            f"reconstruction.block={block} must lie in 1..{self.data.crop} (data.crop)",
        )

    @classmethod
    def load(cls, name_or_path: str | Path | None, overrides: Iterable[str] = ()) -> TrainConfig:
        """Defaults <- YAML preset or file (if any) <- dotted overrides, validated once."""
        raw = cls().to_dict()
        if name_or_path is not None:
            raw = deep_merge(raw, read_yaml(resolve_config_path(name_or_path)))
        return cls.from_dict(apply_overrides(raw, list(overrides)))

    @classmethod
    def coerce(cls, value: TrainConfig | Mapping[str, Any] | None) -> TrainConfig:
        """A typed config from a typed one, its dict form, or None (the defaults)."""
        if isinstance(value, TrainConfig):
            return value
        return cls() if value is None else cls.from_dict(value)


# ------------------------------------------------------------------- dict-level layering
def deep_merge(base: dict[str, Any], update: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Return ``base`` updated recursively by ``update``; unknown keys are errors."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in out:
            raise unknown_key(where, out)
        if isinstance(out[key], dict) and isinstance(value, dict) and out[key]:
            out[key] = deep_merge(out[key], value, where + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _yaml_value(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(f"{where} is not valid YAML: {problem}") from exc


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's keys (a YAML mapping; an empty file changes nothing)."""
    data = _yaml_value(path.read_text(encoding="utf-8"), f"config {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=5"`` -> (["train", "max_steps"], 5); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    value = _yaml_value(raw, f"override '{text}'") if raw.strip() else None
    return key.strip().split("."), value


# Short aliases (``max_steps=N``) besides fully dotted keys.
ALIASES = {
    "max_steps": "train.max_steps",
    "batch_size": "data.batch_size",
    "preset": "model.preset",
}


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides in order to the dict form; each must name an existing key."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] in ALIASES:
            keys = ALIASES[keys[0]].split(".")
        node = cfg
        for i, key in enumerate(keys[:-1]):
            if key not in node or not isinstance(node[key], dict):
                valid = [k for k, v in node.items() if isinstance(v, dict)]
                raise unknown_key(".".join(keys[: i + 1]), valid, text)
            node = node[key]
        leaf = keys[-1]
        # Weight tables are free-form (dataset names are data); everything else must exist.
        free_form = len(keys) >= 2 and keys[-2].endswith("_weights")
        if leaf not in node and not free_form:
            valid = [*node, *ALIASES] if len(keys) == 1 else list(node)
            raise unknown_key(".".join(keys), valid, text)
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


def load_config(name_or_path: str | Path | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``TrainConfig.load(...)`` in its plain dict form (validated the same way)."""
    return TrainConfig.load(name_or_path, overrides).to_dict()


def dump_config(cfg: TrainConfig | Mapping[str, Any]) -> str:
    """YAML of a config (typed or its dict form), keys in definition order."""
    data = cfg.to_dict() if isinstance(cfg, TrainConfig) else dict(cfg)
    return yaml.safe_dump(data, sort_keys=False)
