"""More evaluation subjects from one labelled scan: smooth random deformations + intensity changes.

A frozen-encoder probe or a few-shot evaluation needs each class in several
scans, but public labelled samples come one at a time. A free-form deformation
of a few millimetres plus a different gain, offset, gamma and noise makes a new
"subject" with the same classes and plausibly different anatomy and scanner.
Everything is drawn from one seed, so the same seed always gives the same subject.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
from scipy import ndimage

# Output voxels resampled per map_coordinates call: bounds the coordinate arrays' memory.
_SLAB_VOXELS = 1 << 21


def _bspline_weights(n: int, n_coarse: int) -> np.ndarray:
    """(n, n_coarse) cubic B-spline weights from coarse control points to each voxel.

    Applying them axis by axis (three small matrix products) upsamples the coarse
    field smoothly (C2) at a cost of n_voxels * n_coarse, far below a spline zoom.
    """
    u = np.linspace(0.0, n_coarse - 1.0, n)
    i = np.floor(u).astype(int)
    t = u - i
    basis = (
        (1 - t) ** 3 / 6,
        (3 * t**3 - 6 * t**2 + 4) / 6,
        (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
        t**3 / 6,
    )
    w = np.zeros((n, n_coarse))
    rows = np.arange(n)
    for k, b in enumerate(basis):
        np.add.at(w, (rows, np.clip(i + k - 1, 0, n_coarse - 1)), b)
    return w


def displacement_field(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    max_displacement_mm: float,
    control_spacing_mm: float,
) -> list[np.ndarray]:
    """Smooth random displacement per axis, in voxels of that axis (float32, ``shape``)."""
    coarse = tuple(
        max(2, int(np.ceil(n * s / control_spacing_mm)) + 1)
        for n, s in zip(shape, spacing, strict=True)
    )
    weights = [_bspline_weights(n, c) for n, c in zip(shape, coarse, strict=True)]
    out = []
    for s in spacing:
        field = rng.uniform(-max_displacement_mm, max_displacement_mm, coarse) / s
        for axis, w in enumerate(weights):  # contract each coarse axis into the full one
            field = np.moveaxis(np.tensordot(w, field, axes=(1, axis)), 0, axis)
        out.append(field.astype(np.float32))
    return out


def _warp(volume: np.ndarray, disp: list[np.ndarray], order: int) -> np.ndarray:
    """``volume`` sampled at (grid + disp), in slabs along the first axis to bound memory."""
    shape = volume.shape
    out = np.empty(shape, volume.dtype if order == 0 else np.float32)
    step = max(1, _SLAB_VOXELS // max(1, shape[1] * shape[2]))
    grid_yz = np.indices(shape[1:], dtype=np.float32)
    for x0 in range(0, shape[0], step):
        x1 = min(shape[0], x0 + step)
        xs = np.arange(x0, x1, dtype=np.float32)[:, None, None]
        coords = np.stack(
            [
                xs + disp[0][x0:x1],
                grid_yz[0][None] + disp[1][x0:x1],
                grid_yz[1][None] + disp[2][x0:x1],
            ]
        )
        out[x0:x1] = ndimage.map_coordinates(
            volume, coords, order=order, mode="nearest", prefilter=False
        )
    return out


def _intensity(image: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Gain, offset and gamma on the [min, max] range, plus Gaussian noise; same units back."""
    lo, hi = float(image.min()), float(image.max())
    span = max(hi - lo, 1e-6)
    gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-0.03, 0.03)
    gamma = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    t = np.clip((image - lo) / span, 0.0, 1.0, dtype=np.float32)
    t = np.power(t, gamma, dtype=np.float32) * np.float32(gain) + np.float32(offset)
    t += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise)
    return (t * np.float32(span) + np.float32(lo)).astype(np.float32)


def deformed_subject(
    image: np.ndarray,
    label: np.ndarray,
    spacing: tuple[float, float, float],
    seed: int,
    max_displacement_mm: float = 4.0,
    control_spacing_mm: float = 40.0,
    noise: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """A new subject from (image, label): one smooth random warp of both, new intensities.

    The image is interpolated linearly and the label by nearest neighbour, so the
    label keeps exactly its values. ``max_displacement_mm`` bounds the control-point
    displacements (the smooth field stays below it); ``noise`` is the noise standard
    deviation as a fraction of the image's intensity range. Returns a float32 image
    and a label of the input's dtype, both of the input's shape.
    """
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and label {label.shape} must be one 3-D grid")
    rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in spacing)
    disp = displacement_field(image.shape, spacing, rng, max_displacement_mm, control_spacing_mm)
    warped_label = _warp(np.ascontiguousarray(label), disp, order=0)
    warped = _warp(np.ascontiguousarray(image, dtype=np.float32), disp, order=1)
    return _intensity(warped, rng, noise), warped_label


def write_deformed_subject(
    image_path: str | PathLike[str],
    label_path: str | PathLike[str],
    out_dir: str | PathLike[str],
    name: str,
    seed: int,
    **kwargs: float,
) -> tuple[Path, Path]:
    """Write ``out_dir/<name>.nii.gz`` and ``<name>_label.nii.gz``, deformed from the files given.

    Both keep the source image's affine and header (so the label lies on the image
    grid), and integer images stay integers of the same type (rounded, clipped).
    """
    import nibabel as nib

    src = nib.load(str(image_path))
    lab = nib.load(str(label_path))
    data = np.asarray(src.dataobj)
    labels = np.asarray(lab.dataobj)
    if np.issubdtype(labels.dtype, np.floating):
        labels = np.rint(labels).astype(np.uint16)
    image, label = deformed_subject(data, labels, tuple(src.header.get_zooms()[:3]), seed, **kwargs)
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        image = np.clip(np.rint(image), info.min, info.max).astype(data.dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_out, label_out = out / f"{name}.nii.gz", out / f"{name}_label.nii.gz"
    header = src.header.copy()
    header.set_data_dtype(image.dtype)
    header.set_slope_inter(1.0, 0.0)
    save_nifti_atomic(nib.Nifti1Image(label, src.affine), label_out)
    save_nifti_atomic(nib.Nifti1Image(image, src.affine, header), image_out)
    return image_out, label_out


def save_nifti_atomic(img, path: Path) -> None:
    """Write beside ``path`` and rename: a killed run never leaves a truncated file behind."""
    import nibabel as nib

    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.partial.nii.gz")
    nib.save(img, tmp)
    tmp.replace(path)
