"""The prepare plan: one source of truth for every per-scan parameter.

Saved in the bank beside the data it produced (bank attrs and each scan's
attrs), and hashed into a fingerprint so that re-running with the same plan
skips work and a changed parameter redoes only the scans it affects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

PIPELINE_VERSION = "0.3.0"  # 0.2: pixel-area grid, triangle filter; 0.3: body on native slices
MODALITIES = ("auto", "ct", "mr", "pet")


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
        max_voxels: inputs declaring more voxels are refused before anything is read.
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
    version: str = field(default=PIPELINE_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", _triple(self.spacing))
        object.__setattr__(self, "ct_clip", tuple(float(v) for v in self.ct_clip))
        object.__setattr__(self, "percentiles", tuple(float(v) for v in self.percentiles))
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"target spacing must be positive, got {self.spacing}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(
                f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}"
            )

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> PrepareConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes) -> PrepareConfig:
        return PrepareConfig.from_dict({**self.to_dict(), **changes})

    def fingerprint(self) -> str:
        """Hash of every parameter that changes the stored result."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
