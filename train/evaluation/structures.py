"""Structure classes of a labelled bank, and the label maps behind them.

A structure class is a label value of one dataset that occurs in at least two scans
of that dataset: at least one to serve as its reference, at least one to be
segmented. Scans are grouped by their ``dataset`` attribute, because label values
mean the same only within a dataset. A class is identified by (dataset, value); its
name (from the scans' stored label names) is for display only, so two values never
merge into one row because they share a name. Names that disagree (one value named
differently in two scans of a dataset, or one name given to two values) are an error
naming the scans and values, unless a names file given at evaluation settles them.
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
        """Display key ``dataset/name``; unique per dataset once names are checked."""
        return f"{self.dataset}/{self.name}"

    @property
    def ident(self) -> tuple[str, int]:
        """What identifies the class: (dataset, label value)."""
        return (self.dataset, self.value)


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

    @cached_property
    def subject(self) -> str:
        """The ``subject`` scan metadata when present, else the scan itself.

        Scans of one subject (follow-ups, other sequences, deformed copies) are never split
        between references and queries, nor between fine-tuning parts.
        """
        meta = getattr(self.scan, "metadata", None) or {}
        value = meta.get("subject") if isinstance(meta, dict) else None
        return str(value) if value not in (None, "") else f"scan:{self.scan_id}"

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


def class_names(
    scans: list[LabelledScan], override: dict[int, str] | None = None
) -> dict[tuple[str, int], str]:
    """Display name per (dataset, value); raises when the scans' names disagree.

    ``override`` (value -> name, from ``--label-names FILE``) replaces the stored names,
    which is how a user settles a conflict; values it does not name show as the value.
    """
    seen: dict[tuple[str, int], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    named: dict[tuple[str, str], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for s in scans:
        for value in s.counts:
            name = override.get(value) if override is not None else s.names.get(value)
            if name is not None:
                seen[(s.dataset, value)][str(name)].append(s.scan_id)
                named[(s.dataset, str(name))][value].append(s.scan_id)
    problems = []
    for (dataset, value), by_name in sorted(seen.items()):
        if len(by_name) > 1:
            listed = "; ".join(f"{n!r} in {_few(ids)}" for n, ids in sorted(by_name.items()))
            problems.append(f"dataset {dataset!r} value {value} is named {listed}")
    for (dataset, name), by_value in sorted(named.items()):
        if len(by_value) > 1:
            where = "; ".join(f"value {v} in {_few(ids)}" for v, ids in sorted(by_value.items()))
            problems.append(f"dataset {dataset!r} names {len(by_value)} values {name!r}: {where}")
    names = {
        key: min(by_name, key=lambda n: (-len(by_name[n]), n)) for key, by_name in seen.items()
    }
    if problems:
        raise EvaluationError(
            "the label names of the bank disagree, so rows of different structures would "
            "carry one name: "
            + " | ".join(problems)
            + ". Classes are label values; give --label-names FILE (value -> name) to name "
            "them for this evaluation, or fix the names and prepare again"
        )
    return {(s.dataset, v): names.get((s.dataset, v), str(v)) for s in scans for v in s.counts}


def _few(ids: list[str], n: int = 4) -> str:
    ids = sorted(set(ids))
    more = f" and {len(ids) - n} more" if len(ids) > n else ""
    return "scans " + ", ".join(ids[:n]) + more


def find_classes(
    scans: list[LabelledScan],
    min_voxels: int = 1,
    min_scans: int = 2,
    label_names: dict[int, str] | None = None,
) -> tuple[list[StructureClass], list[dict]]:
    """Classes present (>= ``min_voxels``) in >= ``min_scans`` scans of a dataset.

    Returns the classes, sorted by (dataset, value), and, for every label value left
    out, why (so a user sees that a structure labelled in only one scan could not be
    evaluated). Raises when names disagree (see ``class_names``).
    """
    names = class_names(scans, label_names)
    holders: dict[tuple[str, int], list[str]] = defaultdict(list)
    for s in scans:
        for value, n in s.counts.items():
            if n >= min_voxels:
                holders[(s.dataset, value)].append(s.scan_id)
    classes, skipped = [], []
    for (dataset, value), ids in sorted(holders.items()):
        name = names[(dataset, value)]
        if len(ids) < min_scans:
            skipped.append(
                {
                    "dataset": dataset,
                    "class": name,
                    "value": value,
                    "reason": f"labelled in {len(ids)} scan(s) of dataset {dataset!r}; "
                    f"needs {min_scans} (a reference and a query)",
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
    """The foreground voxel nearest the per-axis median of the mask (reference-crop centre).

    The published protocol centres the crop on the per-axis median; for a U-shaped or
    hollow structure that point lies outside it, and the crop would then show its
    neighbourhood rather than the structure. Taking the nearest foreground voxel keeps the
    median for compact shapes and centres every other shape on itself.
    """
    idx = np.nonzero(mask)
    median = np.array([np.median(a) for a in idx])
    pts = np.stack(idx, axis=1)
    nearest = int(np.argmin(((pts - median) ** 2).sum(axis=1)))
    return tuple(int(v) for v in pts[nearest])  # type: ignore[return-value]


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
