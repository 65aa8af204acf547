"""Where a query's results go, written so that a crash never leaves a half file behind.

Every file is written to a hidden temporary name in its own folder and renamed over the
final name (``os.replace`` is atomic within a folder). The sidecar JSON is written last
and records the network and the task set, so a query counts as done only when its JSON
exists, names the same network and tasks, and the files it lists exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def output_paths(out: str | Path, scan_id: str) -> dict[str, Path]:
    out = Path(out)
    return {
        "seg": out / f"{scan_id}_seg.nii.gz",
        "prob": out / f"{scan_id}_prob.nii.gz",
        "json": out / f"{scan_id}_seg.json",
    }


def _tmp(path: Path) -> Path:
    # the real suffix last: nibabel picks the compression from the name
    return path.parent / f".tmp-{os.getpid()}-{path.name}"


# NIfTI has no half-float type: probabilities are stored as uint8 steps of 1/255 with the
# header's scale (scl_slope), which every reader applies (nibabel's get_fdata, ITK, viewers):
# half of float16's bytes, and 0.5 stays on the foreground side (128/255).
PROB_SCALE = 1.0 / 255.0


def quantise(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 steps of `PROB_SCALE` (nearest step)."""
    return np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_nifti(
    path: Path, data: np.ndarray, affine: np.ndarray, scale: float | None = None
) -> Path:
    """``data`` with ``affine`` (sform and qform, scanner space); ``scale`` sets scl_slope."""
    import nibabel as nib

    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    if scale is not None:
        img.header.set_slope_inter(scale, 0.0)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    tmp = _tmp(path)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, record: dict[str, Any]) -> Path:
    tmp = _tmp(path)
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def completed(
    out: str | Path, scan_id: str, network_sha256: str | None, task_sha256: str, prob: bool
) -> dict[str, Any] | None:
    """The sidecar record of a finished query made with these network and tasks, else None."""
    paths = output_paths(out, scan_id)
    try:
        record = json.loads(paths["json"].read_text())
    except (OSError, ValueError):
        return None
    same = (
        record.get("network_sha256") == network_sha256 and record.get("task_sha256") == task_sha256
    )
    if not same or not paths["seg"].is_file() or (prob and not paths["prob"].is_file()):
        return None
    return record
