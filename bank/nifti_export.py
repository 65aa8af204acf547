"""Write a scan (or a region of it) and chosen masks as NIfTI files for 3D Slicer / ITK-SNAP.

The bank's grid is RAS+ with a stored voxel->world affine, so a NIfTI written with
that affine (shifted to the region's first voxel) lands exactly where the source scan
lies in world space: the exported proposals overlay the original scan in any viewer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .proposal_store import _norm_roi

if TYPE_CHECKING:
    from .scan import ScanView


def shifted_affine(affine: np.ndarray, roi: tuple[slice, slice, slice]) -> np.ndarray:
    """The affine of the sub-grid starting at the roi's first voxel."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = affine[:3, :3] @ np.array([s.start for s in roi], float) + affine[:3, 3]
    return out


def nifti_paths(path: str | Path) -> tuple[Path, Path]:
    """(image path, masks path): ``x.nii.gz`` -> ``x.nii.gz`` and ``x_masks.nii.gz``."""
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return path, path.with_name(name[: -len(ext)] + "_masks" + ext)
    raise ValueError(f"{path}: a NIfTI path ends in .nii or .nii.gz")


def to_nifti(
    scan: ScanView,
    path: str | Path,
    roi: Any = None,
    proposals: Any = None,
    array: str = "image",
    proposal_set: str = "default",
) -> dict[str, Path]:
    """Write ``array`` inside ``roi`` to ``path``; with ``proposals`` also a label map.

    ``proposals``: a list of proposal ids of set ``proposal_set`` (written as labels 1..K
    in that order, a later id winning where two overlap) or the name of a stored label
    array (e.g. ``"label"``, written as stored). The label map goes to
    ``<path stem>_masks.nii.gz``, on the same grid. Returns the written paths by role
    (``image``, ``masks``).
    """
    import nibabel as nib

    image_path, masks_path = nifti_paths(path)
    box = _norm_roi(roi, scan.shape)
    affine = scan.affine
    if affine is None:
        affine = np.diag([*scan.spacing, 1.0])
    affine = shifted_affine(np.asarray(affine, float), box)
    data = np.asarray(scan.read(array, box))
    if data.dtype == np.float16:
        data = data.astype(np.float32)  # NIfTI readers differ on float16
    if data.dtype == bool:
        data = data.astype(np.uint8)
    written = {"image": image_path}
    image_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), image_path)
    if proposals is not None:
        labels = np.asarray(scan.overlay(proposals, box, proposal_set))
        nib.save(nib.Nifti1Image(labels, affine), masks_path)
        written["masks"] = masks_path
    return written
