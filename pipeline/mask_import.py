"""Existing masks (label maps or binary masks) as a proposal set on a prepared scan's grid.

Users often already have masks for their scans -- TotalSegmentator output, an atlas
registration, another lab's annotations -- and the mask-source ablation asks whether
pretraining on them beats our class-agnostic proposals. A mask file lies on the
*source* scan's grid; the bank's scan was reoriented to RAS, resampled and cropped to
the body. This module replays exactly those steps (nearest neighbour), using the
geometry the prepared scan recorded (``attrs["original"]``, ``attrs["crop_box"]``,
``attrs["spacing"]``), so an imported mask lands voxel for voxel where it belongs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.orient import to_ras
from maskbank.pipeline.proposals.external import from_label_map
from maskbank.pipeline.proposals.proposal_set import ProposalSet, merge_sets
from maskbank.pipeline.reader import read_scan
from maskbank.pipeline.resample import output_affine, resample

MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
MAX_VOXELS = 1_500_000_000


def is_mask_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(MASK_SUFFIXES)


def mask_files(where: str | Path) -> list[Path]:
    """A mask file, or every mask file in a folder (sorted; TotalSegmentator's layout)."""
    where = Path(where)
    if is_mask_file(where):
        return [where]
    if where.is_dir():
        return sorted(p for p in where.iterdir() if is_mask_file(p))
    raise ScanError(str(where), "no such mask file or folder")


def on_bank_grid(path: str | Path, attrs: dict[str, Any]) -> np.ndarray:
    """The mask at ``path`` (source grid) resampled, reoriented and cropped like its scan.

    Raises ScanError when the file is not on the source scan's grid (other shape or
    affine) or holds anything but non-negative integers.
    """
    path = str(path)
    original = attrs.get("original") or {}
    box = attrs.get("crop_box")
    if not original or box is None:
        raise ScanError(path, "the scan records no source geometry (prepared by maskbank?)")
    raw = read_scan(path, MAX_VOXELS, check_values=False)
    shape = tuple(int(v) for v in original["shape"])
    src_affine = np.asarray(original["affine"], float)
    if tuple(raw.data.shape) != shape:
        raise ScanError(path, f"mask shape {tuple(raw.data.shape)} differs from its scan's {shape}")
    spacing = np.linalg.norm(src_affine[:3, :3], axis=0)
    if not np.allclose(raw.affine, src_affine, atol=1e-3 * float(spacing.max())):
        raise ScanError(path, "mask affine differs from its scan's (not on the scan's grid)")
    values = np.asarray(raw.data)
    if values.size and (values.min() < 0 or not np.array_equal(values, np.round(values))):
        raise ScanError(path, "a mask must hold non-negative integers (labels or 0/1)")
    if values.size and values.max() > np.iinfo(np.uint16).max:
        raise ScanError(path, f"label value {values.max():g} does not fit uint16")
    target = tuple(float(v) for v in attrs["spacing"])
    label, _ = resample(values.astype(np.uint16), src_affine, target, is_label=True)
    label, _ = to_ras(label, output_affine(src_affine, tuple(spacing), target), copy=False)
    crop = tuple(slice(int(a), int(b)) for a, b in box)
    return np.ascontiguousarray(label[crop])


def pack_binary(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Binary masks packed into as few label layers as overlaps allow (first fit).

    A layer is a partition: masks that do not overlap share one layer with values
    1..n, so 100 organ masks cost a few layers, not 100 volumes.
    """
    layers: list[np.ndarray] = []
    counts: list[int] = []
    for mask in masks:
        for j, layer in enumerate(layers):
            if not (layer[mask] != 0).any():
                counts[j] += 1
                layer[mask] = counts[j]
                break
        else:
            layer = np.zeros(mask.shape, np.uint16)
            layer[mask] = 1
            layers.append(layer)
            counts.append(1)
    return layers


def imported_set(files: Sequence[str | Path], attrs: dict[str, Any], source: str) -> ProposalSet:
    """One proposal per non-zero label of each file, all on the scan's bank grid.

    Label maps (values beyond 1) keep one layer each; binary masks are packed
    (``pack_binary``). Features are left to the caller (``compute_features``).
    """
    if not files:
        raise ScanError(source, "no mask files to import")
    maps, binary = [], []
    for f in files:
        grid = on_bank_grid(f, attrs)
        (binary if grid.max(initial=0) <= 1 else maps).append(grid)
    layers = maps + pack_binary([b.astype(bool) for b in binary if b.any()])
    if not layers:
        raise ScanError(str(files[0]), "every imported mask is empty on the scan's grid")
    sets = [
        from_label_map(layer, source=source, layer_name=f"{source}{j}")
        for j, layer in enumerate(layers)
    ]
    return merge_sets(sets)
