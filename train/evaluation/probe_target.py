"""What the probe predicts, and its folds.

The target is a metadata column of the scans (``diagnosis``) or ``has:<class>`` (does
the scan's label map hold the class; by label name or value). Stratified k-fold
cross-validation gives every scan one out-of-fold prediction; the folds are reduced
when a class has fewer scans than folds (every test fold holds every class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from maskbank.train.seeding import numpy_rng

from .errors import EvaluationError

HAS_PREFIX = "has:"
ABSENT, PRESENT = "absent", "present"  # the classes of a has:<class> target (sorted order)


@dataclass
class ProbeTarget:
    """What is predicted: one class string per scan, and the sorted classes."""

    name: str
    kind: str  # "metadata" (a manifest column) or "label" (has:<class>)
    values: dict[str, str]  # scan id -> class
    classes: list[str]

    def y(self, scan_ids: Sequence[str]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[self.values[s]] for s in scan_ids], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        vals = list(self.values.values())
        return {c: vals.count(c) for c in self.classes}


def _shorten(ids: Sequence[str], n: int = 10) -> str:
    ids = list(ids)
    return ", ".join(ids[:n]) + (f" ... ({len(ids)} in all)" if len(ids) > n else "")


def _metadata_target(scans: Sequence, column: str) -> ProbeTarget:
    values: dict[str, str] = {}
    missing: list[str] = []
    columns: set[str] = set()
    for scan in scans:
        meta = scan.metadata
        columns.update(meta)
        if meta.get(column, "").strip():
            values[scan.scan_id] = meta[column].strip()
        else:
            missing.append(scan.scan_id)
    if not values:
        have = ", ".join(sorted(columns)) or "none"
        raise EvaluationError(
            f"no scan has the metadata column {column!r} (columns in these scans: {have}); "
            f"give --target COLUMN with one of them, or has:<class> for a label class"
        )
    if missing:
        raise EvaluationError(
            f"target {column!r} is missing in {len(missing)} scan(s): {_shorten(missing)}; "
            "fill the column in the manifest for them, or leave them out with --scans"
        )
    return ProbeTarget(column, "metadata", values, sorted(set(values.values())))


def _label_target(scans: Sequence, spec: str) -> ProbeTarget:
    wanted = spec[len(HAS_PREFIX) :].strip()
    if not wanted:
        raise EvaluationError("--target has: needs a class name or value, e.g. has:lesion")
    unlabelled = [s.scan_id for s in scans if not s.has("label")]
    if unlabelled:
        raise EvaluationError(
            f"--target {spec} reads label maps, but {len(unlabelled)} scan(s) have none: "
            f"{_shorten(unlabelled)}; leave them out with --scans"
        )
    by_dataset: dict[str, set[int]] = {}
    every: set[int] = set()
    names: set[str] = set()
    for scan in scans:
        for value, name in scan.label_names.items():
            names.add(name)
            if name == wanted:
                by_dataset.setdefault(scan.dataset or "default", set()).add(value)
                every.add(value)
    if not every and wanted.lstrip("-").isdigit():
        every = {int(wanted)}
    if not every:
        have = ", ".join(sorted(names)) or "none (give the label value, e.g. has:3)"
        raise EvaluationError(
            f"no label class named {wanted!r} in these scans (label names: {have}); "
            "give --target has:<name> or has:<value>"
        )
    values: dict[str, str] = {}
    for scan in scans:
        candidates = by_dataset.get(scan.dataset or "default", every)
        if len(candidates) > 1:
            raise EvaluationError(
                f"label class {wanted!r} has several values {sorted(candidates)} in dataset "
                f"{scan.dataset!r}; give the value instead, e.g. has:{min(candidates)}"
            )
        label = np.asarray(scan.read("label"))
        present = bool((label == next(iter(candidates))).any())
        values[scan.scan_id] = PRESENT if present else ABSENT
    return ProbeTarget(spec, "label", values, sorted(set(values.values())))


def resolve_target(scans: Sequence, target: str) -> ProbeTarget:
    """A metadata column (``diagnosis``) or ``has:<class>`` (name from label names, or value)."""
    if target.startswith(HAS_PREFIX):
        return _label_target(scans, target)
    return _metadata_target(scans, target)


def plan_folds(target: ProbeTarget, folds: int) -> tuple[int, list[str]]:
    """Folds that stratification allows (each class in every test fold), and any warning."""
    counts = target.counts()
    if len(counts) < 2:
        raise EvaluationError(
            f"target {target.name!r} has one class only ({_shorten(list(counts))}) in these "
            "scans; a probe needs at least two classes"
        )
    small = {c: n for c, n in counts.items() if n < 2}
    if small:
        detail = "; ".join(
            f"{c!r}: {_shorten([s for s, v in target.values.items() if v == c])}" for c in small
        )
        raise EvaluationError(
            f"target {target.name!r}: class(es) with fewer than 2 scans ({detail}); "
            "cross-validation needs each class in at least two scans: add scans or merge classes"
        )
    fewest = min(counts.values())
    if fewest >= folds:
        return folds, []
    rare = min(counts, key=lambda c: counts[c])
    return fewest, [
        f"--folds {folds} reduced to {fewest}: class {rare!r} has only {fewest} scans "
        "(every test fold must hold every class)"
    ]


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Test indices of each fold; each class shuffled and dealt round-robin (sizes differ <= 1)."""
    rng = numpy_rng(seed)
    out: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for c in np.unique(y):
        members = rng.permutation(np.nonzero(y == c)[0])
        for j, i in enumerate(members):
            out[(offset + j) % folds].append(int(i))
        offset += len(members)
    return [np.array(sorted(f), dtype=np.int64) for f in out]
