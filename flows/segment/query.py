"""One query scan on the network's grid: read, RAS, resample, body crop, normalise.

Exactly `pipeline.prepare.prepare_scan` (the same reader, geometry and normalisation
the bank was made with), plus a header-first memory check for what segmenting adds to
preparing: a group's probability maps on the prepared grid and the outputs on the
original grid. A query over the budget fails before its voxels are read.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from maskbank.pipeline.config import PrepareConfig, default_scan_memory
from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.prepare import (
    DICOM_SERIES_KEY,
    PreparedScan,
    estimate_peak_bytes,
    prepare_scan,
)
from maskbank.pipeline.reader import ScanHeader, read_scan
from maskbank.pipeline.resample import output_shape

from .geometry import GridMap

# Per prepared voxel and task of a group: MONAI's blended output and its weight map,
# the thresholded copy; per prepared voxel: the label map and the best probability.
_GROUP_BYTES = 12
_LABEL_BYTES = 8
# Coarse to fine (a zoomed class refined): its coarse map (float32) and gate (bool) stay
# while the finer pass runs, per prepared voxel and task of the group.
_REFINE_BYTES = 5


def segment_bytes_on_grid(n_voxels: int, group: int, refine: bool = False) -> int:
    """Peak bytes of segmenting a prepared volume of ``n_voxels`` in groups of ``group``
    tasks (``refine``: some class is zoomed and refined coarse to fine)."""
    per_task = _GROUP_BYTES + (_REFINE_BYTES if refine else 0)
    return n_voxels * (4 + group * per_task + _LABEL_BYTES)


class _HeaderRead(Exception):
    """Stops `read_scan` once the header has been checked (no voxel is read)."""


def estimate_segment_bytes(
    header: ScanHeader,
    spacing: tuple[float, float, float],
    group: int,
    n_labels: int,
    prob: bool,
    refine: bool = False,
) -> int:
    """Peak memory of segmenting one scan, from its header: preparing it, or the outputs."""
    prepare = estimate_peak_bytes(header, spacing)
    n_in = math.prod(header.shape)
    n_out = math.prod(output_shape(header.shape, header.spacing, spacing))
    on_grid = segment_bytes_on_grid(n_out, group, refine)
    outputs = n_in * (2 + (2 * n_labels if prob else 0))
    return max(prepare["input"] + prepare["resampled"], on_grid + outputs)


@dataclass
class PreparedQuery:
    """The normalised image on the network's grid and the map back to the scan's own."""

    image: np.ndarray  # float32 [x, y, z] RAS, normalised, cropped to the body
    grid: GridMap
    affine: np.ndarray  # the original voxel->world affine (the outputs')
    modality: str
    attrs: dict


def check_memory(
    path: str,
    spacing: tuple[float, float, float],
    budget: int,
    group: int,
    n_labels: int,
    prob: bool,
    series: str | None = None,
    refine: bool = False,
) -> None:
    """Refuse (`ScanError`) a query whose estimate exceeds ``budget``, reading its header only."""

    def check(header: ScanHeader) -> None:
        need = estimate_segment_bytes(header, spacing, group, n_labels, prob, refine)
        if need > budget:
            raise ScanError(
                path,
                f"segmenting needs about {need / 2**30:.2f} GiB ({header.shape} voxels at "
                f"{tuple(round(v, 3) for v in header.spacing)} mm, {n_labels} labels), above "
                f"the per-scan budget of {budget / 2**30:.2f} GiB; raise --max-scan-memory or "
                "run fewer --workers",
            )
        raise _HeaderRead

    with contextlib.suppress(_HeaderRead):
        read_scan(path, target_spacing=spacing, on_header=check, series=series)


def prepare_query(
    path: str,
    spacing: tuple[float, float, float],
    modality: str = "auto",
    budget: int | None = None,
    *,
    group: int = 1,
    n_labels: int = 1,
    prob: bool = False,
    series: str | None = None,
    refine: bool = False,
) -> PreparedQuery:
    """Read and prepare ``path`` as the pretraining bank's scans were; `ScanError` if unusable."""
    budget = budget or default_scan_memory()
    check_memory(path, spacing, budget, group, n_labels, prob, series, refine)
    config = PrepareConfig(
        spacing=spacing, modality=modality, max_scan_memory=budget, image_dtype="float32"
    )
    prepared: PreparedScan = prepare_scan(
        path, config=config, metadata={DICOM_SERIES_KEY: series} if series else None
    )
    original = prepared.attrs["original"]
    affine = np.asarray(original["affine"], dtype=np.float64)
    grid = GridMap.between(original["shape"], affine, prepared.image.shape, prepared.affine)
    return PreparedQuery(prepared.image, grid, affine, prepared.attrs["modality"], prepared.attrs)
