"""Structure classes of a labelled bank, and the label maps behind them.

A structure class is a label value of one dataset (shown by its name when the scan
stores label names) that occurs in at least two scans of that dataset: one to be
segmented, at least one other to serve as its reference. Scans are grouped by their
``dataset`` attribute, because label values mean the same only within a dataset.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import EvaluationError


@dataclass(frozen=True)
class StructureClass:
    dataset: str
    value: int
    name: str
    scans: tuple[str, ...]  # scans of the dataset whose label map holds it, sorted

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.name}"


class LabelledScan:
    """One scan with a label map; arrays are decoded once, on first use."""

    def __init__(self, scan) -> None:
        self.scan = scan
        self.scan_id: str = scan.scan_id
        self.dataset: str = scan.dataset or "default"
        self.spacing: tuple[float, float, float] = scan.spacing

    @cached_property
    def image(self) -> np.ndarray:
        return np.asarray(self.scan.read("image"), dtype=np.float32)

    @cached_property
    def label(self) -> np.ndarray:
        return np.asarray(self.scan.read("label"))

    @cached_property
    def counts(self) -> dict[int, int]:
        """Voxels per non-zero label value."""
        counts = np.bincount(self.label.ravel().astype(np.int64))
        return {int(v): int(c) for v, c in enumerate(counts) if v and c}

    @cached_property
    def names(self) -> dict[int, str]:
        return dict(self.scan.label_names)

    def mask(self, value: int) -> np.ndarray:
        return self.label == value


def labelled_scans(bank, scan_ids: list[str] | None = None) -> list[LabelledScan]:
    """The scans of ``bank`` (or of ``scan_ids``) that have a label map, sorted by id."""
    views = (bank.scan(s) for s in sorted(scan_ids or bank.scan_ids))
    out = [LabelledScan(v) for v in views if v.has("label")]
    if not out:
        raise EvaluationError(
            f"bank {bank.location} has no scan with a label map, so there is nothing to "
            "evaluate on; prepare labelled scans into it (a `label` column in the manifest, "
            "or <scan>_label.nii.gz beside each scan; names with --label-names FILE)"
        )
    return out


def find_classes(
    scans: list[LabelledScan], min_voxels: int = 1, min_scans: int = 2
) -> tuple[list[StructureClass], list[dict]]:
    """Classes present (>= ``min_voxels``) in >= ``min_scans`` scans of a dataset.

    Returns the classes and, for every label value left out, why (so a user sees
    that a structure labelled in only one scan could not be evaluated).
    """
    holders: dict[tuple[str, int], list[str]] = defaultdict(list)
    names: dict[tuple[str, int], str] = {}
    for s in scans:
        for value, n in s.counts.items():
            if n >= min_voxels:
                holders[(s.dataset, value)].append(s.scan_id)
                names.setdefault((s.dataset, value), s.names.get(value, str(value)))
    classes, skipped = [], []
    for (dataset, value), ids in sorted(holders.items()):
        name = names[(dataset, value)]
        if len(ids) < min_scans:
            skipped.append(
                {
                    "dataset": dataset,
                    "class": name,
                    "reason": f"labelled in {len(ids)} scan(s) of dataset {dataset!r}; "
                    f"needs {min_scans} (a query and a reference)",
                }
            )
            continue
        classes.append(StructureClass(dataset, value, name, tuple(sorted(ids))))
    return classes, skipped


def require_classes(classes: list[StructureClass], skipped: list[dict], bank) -> None:
    if classes:
        return
    why = "; ".join(f"{s['dataset']}/{s['class']}: {s['reason']}" for s in skipped[:5])
    raise EvaluationError(
        f"bank {bank.location} has labels but no structure class occurs in two scans of the "
        f"same dataset ({why or 'no label values'}); add labelled scans of the same dataset"
    )


def median_foreground(mask: np.ndarray) -> tuple[int, int, int]:
    """Median voxel of a mask per axis (the published reference-crop centre)."""
    idx = np.nonzero(mask)
    return tuple(int(np.median(a)) for a in idx)  # type: ignore[return-value]


def centred_crop(volume: np.ndarray, centre: tuple[int, ...], size: int, fill: float) -> np.ndarray:
    """``size``^3 crop of ``volume`` centred on ``centre``; outside the volume is ``fill``."""
    out = np.full((size,) * 3, fill, dtype=volume.dtype)
    src, dst = [], []
    for c, n in zip(centre, volume.shape, strict=True):
        lo = c - size // 2
        a, b = max(lo, 0), min(lo + size, n)
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = volume[tuple(src)]
    return out
