"""The prepare plan: one source of truth for every per-scan parameter.

Saved in the bank beside the data it produced (bank attrs and each scan's
attrs), and hashed into a fingerprint so that re-running with the same plan
skips work and a changed parameter redoes only the scans it affects.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields

PIPELINE_VERSION = "0.3.0"  # 0.2: pixel-area grid, triangle filter; 0.3: body on native slices
MODALITIES = ("auto", "ct", "mr", "pet")
ID_FROM = ("name", "hash")
# How a run is carried out, not what it produces: kept out of the fingerprint, so changing
# them never forces re-preparing scans that are already in the bank.
NOT_FINGERPRINTED = ("max_scan_memory", "id_from")
# Share of the machine's memory the per-scan tasks may use together (the rest: OS, Dask,
# the flow itself, page cache).
MEMORY_SHARE = 0.75
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def known_keys(data: Mapping, valid: Iterable[str], what: str, legacy: Iterable[str] = ()) -> dict:
    """``data`` without its ``legacy`` keys (parameters older banks recorded and this version
    no longer has: tolerated when reading their attributes back, and dropped); any other key
    not in ``valid`` is a ``ValueError`` naming the closest valid one, as the training config
    refuses its unknown keys."""
    valid, legacy = list(valid), set(legacy)
    for key in data:
        if key not in valid and key not in legacy:
            match = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f" (did you mean '{match[0]}'?)" if match else f"; valid keys: {sorted(valid)}"
            raise ValueError(f"unknown {what} key '{key}'{hint}")
    return {k: v for k, v in data.items() if k not in legacy}


def parse_size(text: str | int) -> int:
    """Bytes from ``8G``, ``512MiB``, ``1.5g``, ``2000000`` (binary units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.I)
    if not match:
        raise ValueError(f"size {text!r}: expected a number with an optional unit, e.g. 8G, 512M")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def machine_memory() -> int:
    """Physical memory in bytes, lowered to a cgroup (container, SLURM job) limit if any."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    for limit_file in cgroup:
        try:
            with open(limit_file) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_scan_memory(workers: int = 1) -> int:
    """Per-task budget when none is given: a share of the machine split among the workers."""
    return int(machine_memory() * MEMORY_SHARE / max(1, int(workers)))


def _triple(value: float | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ValueError(f"spacing needs 1 or 3 values, got {len(values)}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class PrepareConfig:
    """Parameters of the per-scan preparation (reading → RAS → resample → normalise → crop).

    Attributes:
        spacing: target voxel spacing in mm (x, y, z).
        modality: ``auto`` detects CT from the Hounsfield range, else MR; PET must be declared.
        ct_clip: HU window applied to CT before z-scoring.
        percentiles: intensity percentiles (inside the body) that MR and PET are clipped to.
        body_margin_mm: margin kept around the body bounding box.
        ct_body_hu: HU threshold separating body from air for the CT body mask.
        max_voxels: inputs declaring more voxels, or whose resampled grid would hold more,
            are refused before anything is read.
        max_scan_memory: per-scan peak memory budget in bytes, checked against an estimate
            from the header before reading; None: `default_scan_memory` of the machine the
            scan runs on. Not fingerprinted.
        id_from: ``name`` (ids from file names, paths kept in the bank) or ``hash`` (ids
            from the content, no file or folder names stored). Not fingerprinted.
        image_dtype: dtype stored in the bank for the normalised image.
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    modality: str = "auto"
    ct_clip: tuple[float, float] = (-991.0, 500.0)
    percentiles: tuple[float, float] = (2.0, 98.0)
    body_margin_mm: float = 10.0
    ct_body_hu: float = -500.0
    max_voxels: int = 1_500_000_000
    image_dtype: str = "float16"
    max_scan_memory: int | None = None
    id_from: str = "name"
    version: str = field(default=PIPELINE_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", _triple(self.spacing))
        object.__setattr__(self, "ct_clip", tuple(float(v) for v in self.ct_clip))
        object.__setattr__(self, "percentiles", tuple(float(v) for v in self.percentiles))
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"target spacing must be positive, got {self.spacing}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.max_scan_memory is not None:
            object.__setattr__(self, "max_scan_memory", parse_size(self.max_scan_memory))
        if self.id_from not in ID_FROM:
            raise ValueError(f"id_from must be one of {ID_FROM}, got {self.id_from!r}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(
                f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}"
            )

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    # Parameters older versions recorded in scan attributes and this one no longer has:
    # tolerated (and dropped) by ``from_dict``; any other unknown key is refused.
    LEGACY_KEYS = ("anisotropy_threshold",)

    @classmethod
    def from_dict(cls, data: Mapping) -> PrepareConfig:
        """From ``to_dict()``'s form; an unknown key is a ValueError naming the closest one."""
        names = [f.name for f in fields(cls)]
        return cls(**known_keys(data, names, "prepare config", cls.LEGACY_KEYS))

    def replace(self, **changes) -> PrepareConfig:
        return PrepareConfig.from_dict({**self.to_dict(), **changes})

    def fingerprint(self) -> str:
        """Hash of every parameter that changes the stored result."""
        params = {k: v for k, v in self.to_dict().items() if k not in NOT_FINGERPRINTED}
        blob = json.dumps(params, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
