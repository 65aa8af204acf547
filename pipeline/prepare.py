"""One scan from raw file to bank-ready arrays: read → RAS → resample → body crop → normalise.

Pure function of (file contents, label contents, label names file, metadata,
PrepareConfig): the flow hashes those to decide whether a scan must be redone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskbank.pipeline.body import body_mask, crop_box
from maskbank.pipeline.config import PrepareConfig, default_scan_memory
from maskbank.pipeline.decode_overlap import DecodeOverlap
from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.label_names import names_present, read_label_names
from maskbank.pipeline.modality import detect_modality
from maskbank.pipeline.normalize import apply_normalization, normalization_params
from maskbank.pipeline.orient import native_box, ras_affine, ras_axes, to_ras
from maskbank.pipeline.reader import RawScan, ScanHeader, read_scan, sha256_of
from maskbank.pipeline.resample import (
    PlanePass,
    nearest_index,
    output_affine,
    output_shape,
    resample,
    resample_planes,
)

# Rough allowance for making a scan's mask proposals (supervoxels, features, windows),
# per voxel of the resampled grid; proposals run in the same task as prepare.
PROPOSAL_BYTES_PER_VOXEL = 48
# Per resampled voxel while preparing: float32 after the slice pass, its contiguous
# cropped copy, the body mask and its temporaries, the float16 result.
_OUTPUT_BYTES_PER_VOXEL = 16
# A manifest column (scan metadata) naming the DICOM series to read from a folder.
DICOM_SERIES_KEY = "dicom_series"


def estimate_peak_bytes(
    header: ScanHeader, target: tuple[float, float, float], label: bool = False
) -> dict[str, int]:
    """Peak memory of preparing (and proposing) one scan, from its header alone.

    Why: a scan must be refused before its buffers exist, or one absurd file takes the
    whole worker (and every other scan on it) down with it. The parts, in bytes: the
    input (voxel buffer, compressed file, float32 copies), the resampled grid (the
    in-plane intermediate with the worst slice axis, plus the output arrays), the
    label (input and output), and the proposals; ``peak`` is the larger of preparing
    (input + resampled + label) and proposing (output image + proposals).
    """
    n_in = math.prod(header.shape)
    out = output_shape(header.shape, header.spacing, target)
    n_out = math.prod(out)
    inter = max(n_out // out[a] * header.shape[a] for a in range(3))
    parts = {
        "input": n_in * (header.itemsize + (8 if header.float_copy else 0)) + header.file_bytes,
        "resampled": inter * 4 + n_out * _OUTPUT_BYTES_PER_VOXEL,
        "label": n_in * 4 + n_out * 2 if label else 0,
        "proposals": n_out * PROPOSAL_BYTES_PER_VOXEL,
    }
    prepare = parts["input"] + parts["resampled"] + parts["label"]
    parts["peak"] = max(prepare, n_out * 2 + parts["proposals"])
    return parts


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _memory_check(config: PrepareConfig, label: bool):
    """``on_header`` for `read_scan`: refuse a scan whose estimate exceeds the budget."""
    budget = config.max_scan_memory or default_scan_memory()

    def check(header: ScanHeader) -> None:
        est = estimate_peak_bytes(header, config.spacing, label)
        if est["peak"] > budget:
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in est.items() if k != "peak" and v)
            raise ScanError(
                header.path,
                f"needs about {_gib(est['peak'])} of memory ({header.shape} voxels at "
                f"{tuple(round(v, 3) for v in header.spacing)} mm to {config.spacing} mm: "
                f"{parts}), above the per-scan budget of {_gib(budget)}; raise "
                "--max-scan-memory, run fewer --workers, or use a coarser --spacing",
            )

    return check


@dataclass
class PreparedScan:
    """Bank-ready arrays of one scan and the attributes that describe how they were made."""

    image: np.ndarray  # config.image_dtype, normalised, [x, y, z] RAS
    body: np.ndarray  # bool
    label: np.ndarray | None  # uint16 or None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    attrs: dict

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"image": self.image, "body": self.body}
        if self.label is not None:
            out["label"] = self.label
        return out


def _read_label(path: str, image: RawScan, config: PrepareConfig) -> np.ndarray:
    # labels may be all background: no value checks
    label = read_scan(path, config.max_voxels, check_values=False, target_spacing=config.spacing)
    if label.data.shape != image.data.shape:
        raise ScanError(
            path, f"label shape {label.data.shape} differs from image shape {image.data.shape}"
        )
    if not np.allclose(label.affine, image.affine, atol=1e-3 * max(image.spacing)):
        raise ScanError(path, "label affine differs from the image affine (not on the same grid)")
    values = label.data
    if values.min() < 0 or not np.array_equal(values, np.round(values)):
        raise ScanError(path, "label map must hold non-negative integers")
    if values.max() > np.iinfo(np.uint16).max:
        raise ScanError(path, f"label value {values.max():g} does not fit uint16")
    return values.astype(np.uint16)


def _body_and_image(
    planes: PlanePass,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    modality: str,
    config: PrepareConfig,
    path: str,
) -> tuple[np.ndarray, tuple[slice, slice, slice], np.ndarray]:
    """Body mask and crop box (RAS, final grid) and the cropped float32 image (C-order RAS).

    When the slice axis is up-sampled (a 5 mm CT to 1.5 mm) the body is found on the
    native slices, ~3x fewer voxels, and carried to the final grid by nearest
    neighbour: interpolated slices hold no new evidence of where the body is. The
    in-plane crop is then applied before the pass across slices, so only the body's
    box is up-sampled. Otherwise the body is found on the final grid.
    """
    if planes.step < 1.0:
        coarse = to_ras(planes.native(), planes.affine, copy=False)[0]
        body = _require_body(body_mask(coarse, modality, config.ct_body_hu), modality, path)
        axis, flipped = ras_axes(affine)[planes.slice_axis]
        n_in = coarse.shape[axis]
        index = nearest_index(n_in, planes.n_out, planes.step)
        body = np.take(body, (n_in - 1 - index)[::-1] if flipped else index, axis=axis)
        box = crop_box(body, config.spacing, config.body_margin_mm)
        native = native_box(box, affine, shape)
        across = [s if a == planes.slice_axis else slice(None) for a, s in enumerate(native)]
        in_plane = [slice(None) if a == planes.slice_axis else s for a, s in enumerate(native)]
        image = planes.finish(tuple(in_plane))[tuple(across)]  # type: ignore[arg-type]
        view = to_ras(image, affine, copy=False)[0]
    else:
        full = to_ras(planes.finish(), affine, copy=False)[0]
        body = _require_body(body_mask(full, modality, config.ct_body_hu), modality, path)
        box = crop_box(body, config.spacing, config.body_margin_mm)
        view = full[box]
    body = np.ascontiguousarray(body[box])
    return body, box, np.ascontiguousarray(view, dtype=np.float32)  # the one copy of the image


def _require_body(body: np.ndarray, modality: str, path: str) -> np.ndarray:
    if not body.any():
        raise ScanError(
            path,
            f"no body found (modality {modality}): the image has no foreground above the background",
        )
    return body


def prepare_scan(
    image_path: str | Path,
    label_path: str | Path | None = None,
    *,
    config: PrepareConfig | None = None,
    dataset: str = "default",
    source_sha256: str | None = None,
    label_names: str | Path | None = None,
    metadata: dict[str, str] | None = None,
) -> PreparedScan:
    """Run the whole per-scan pipeline; raises `ScanError` for unusable input.

    ``label_names`` is a names file (`pipeline.label_names`) for the label's values;
    it is ignored without a label. ``metadata`` (e.g. a diagnosis, the target of a
    frozen-encoder probe) is stored as given, values as strings; its ``dicom_series``
    names the series to read from a DICOM folder holding several. A scan whose
    estimated peak memory (`estimate_peak_bytes`) exceeds ``config.max_scan_memory``
    is refused before its voxels are read.
    """
    config = config or PrepareConfig()
    path = str(image_path)
    names = read_label_names(label_names) if label_names and label_path else None
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    raw = read_scan(  # voxels decode in the background
        path,
        config.max_voxels,
        stream=True,
        target_spacing=config.spacing,
        on_header=_memory_check(config, label_path is not None),
        series=(metadata or {}).get(DICOM_SERIES_KEY),
    )
    original = {
        "shape": list(raw.data.shape),
        "spacing": list(raw.spacing),
        "affine": raw.affine.tolist(),
    }
    label_raw = _read_label(str(label_path), raw, config) if label_path else None
    timings["read"] = time.perf_counter() - t0

    # Resample in the file's own voxel order, plane block by plane block as the file
    # decodes; the pass across slices comes after the body crop (`_body_and_image`).
    # Image and label share one grid because they share one affine. Values are checked
    # once the decode is complete.
    t = time.perf_counter()
    with DecodeOverlap(raw.wait, raw.data.nbytes, raw.pending is not None) as overlap:
        planes = resample_planes(raw.data, raw.affine, config.spacing, wait=overlap.wait)
    raw.finish(check_values=True)
    timings["decode_planes"] = time.perf_counter() - t  # overlapped: decode ∥ in-plane pass
    t = time.perf_counter()
    sha = raw.sha256 or (None if source_sha256 else sha256_of(path))
    modality = config.modality if config.modality != "auto" else detect_modality(raw.data)
    shape = output_shape(raw.data.shape, raw.spacing, config.spacing)
    affine = output_affine(raw.affine, raw.spacing, config.spacing)
    label = (
        resample(label_raw, raw.affine, config.spacing, is_label=True)[0]
        if label_raw is not None
        else None
    )
    del raw
    if label is not None:
        label = to_ras(label, affine, copy=False)[0]
    timings["modality_label"] = time.perf_counter() - t

    t = time.perf_counter()
    body, box, data = _body_and_image(planes, affine, shape, modality, config, path)
    del planes
    if label is not None:
        label = np.ascontiguousarray(label[box])
    start = np.array([s.start for s in box], dtype=np.float64)
    affine = ras_affine(affine, shape)
    affine[:3, 3] += affine[:3, :3] @ start
    timings["body_slices_crop"] = time.perf_counter() - t

    t = time.perf_counter()
    norm = normalization_params(data, body, modality, config)
    image = apply_normalization(data, norm, config.image_dtype, overwrite_input=True)
    timings["normalise"] = time.perf_counter() - t

    keep_paths = config.id_from != "hash"  # hashed ids: no file or folder names in the bank
    attrs = {
        "source_path": str(Path(path).resolve()) if keep_paths else None,
        "source_sha256": source_sha256 or sha,
        "label_path": str(Path(label_path).resolve()) if label_path and keep_paths else None,
        "label_sha256": sha256_of(label_path) if label_path else None,
        "dataset": dataset,
        "modality": modality,
        "metadata": {str(k): str(v) for k, v in (metadata or {}).items()},
        "original": original,
        "shape": list(image.shape),
        "spacing": list(config.spacing),
        "affine": affine.tolist(),
        "crop_box": [[int(s.start), int(s.stop)] for s in box],
        "normalization": norm,
        "config": config.to_dict(),
        "fingerprint": config.fingerprint(),
        "pipeline_version": config.version,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
    if names is not None and label is not None:
        attrs["label_names"] = names_present(names, label)
        if keep_paths:
            attrs["label_names_path"] = str(Path(label_names).resolve())  # type: ignore[arg-type]
        attrs["label_names_sha256"] = sha256_of(label_names)
    return PreparedScan(image, body, label, tuple(config.spacing), affine, attrs)
