"""A label map taken onto the network's grid and back lands on the scan's own voxels.

The forward path is the pipeline's own (`prepare_scan` with the label: RAS, nearest-
neighbour resampling, body crop); the way back is `GridMap` from the query's prepared
grid. At the scan's own spacing the round trip must be the identity, voxel for voxel,
on oblique, LPS and permuted anisotropic grids; at another spacing the labels must come
back up to resampling error, which a one-voxel shift would exceed.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from maskbank.flows.segment.geometry import GridMap
from maskbank.flows.segment.query import prepare_query
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.prepare import prepare_scan


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    cz, sz = np.cos(np.radians(deg_z)), np.sin(np.radians(deg_z))
    cx, sx = np.cos(np.radians(deg_x)), np.sin(np.radians(deg_x))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


def _write(tmp_path, name, image, label, affine):
    img, lab = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_label.nii.gz"
    nib.save(nib.Nifti1Image(np.round(image).astype(np.int16), affine), img)
    nib.save(nib.Nifti1Image(label.astype(np.uint16), affine), lab)
    return str(img), str(lab)


def _case(tmp_path, kind: str):
    """(image path, label path, original label, spacing) of one awkward grid."""
    ph = make_phantom("ct", shape=(40, 36, 24), spacing=(1.0, 1.0, 1.0), seed=3)
    image, label = ph.image, ph.labels
    if kind == "oblique":
        spacing = (1.2, 1.1, 1.6)
        affine = np.eye(4)
        affine[:3, :3] = _rotation(23.0, 11.0) @ np.diag(spacing)
        affine[:3, 3] = (-30.5, 12.25, 40.0)
    elif kind == "lps":
        spacing = (0.9, 0.9, 2.0)
        affine = np.diag([-0.9, -0.9, 2.0, 1.0])  # x grows to the Left, y to the Posterior
        affine[:3, 3] = (20.0, 15.0, -30.0)
    else:  # anisotropic thick slices, voxel axes permuted (slice axis first, y flipped)
        image, label = image.transpose(2, 1, 0), label.transpose(2, 1, 0)
        spacing = (3.0, 0.8, 0.7)
        affine = np.zeros((4, 4))
        affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = 0.7, -0.8, 3.0, 1.0
        affine[:3, 3] = (-10.0, 25.0, 5.0)
    img, lab = _write(tmp_path, kind, image, label, affine)
    return img, lab, label, spacing


def _round_trip(img: str, lab: str, spacing) -> tuple[np.ndarray, GridMap]:
    prepared = prepare_scan(img, lab, config=PrepareConfig(spacing=spacing))
    query = prepare_query(img, spacing)
    assert query.grid.prepared_shape == prepared.label.shape
    np.testing.assert_allclose(query.affine, nib.load(img).affine, atol=1e-6)
    return query.grid.to_original(prepared.label), query.grid


@pytest.mark.parametrize("kind", ["oblique", "lps", "anisotropic"])
def test_round_trip_at_the_scans_own_spacing_is_the_identity(tmp_path, kind):
    img, lab, label, spacing = _case(tmp_path, kind)
    back, grid = _round_trip(img, lab, spacing)
    assert back.shape == label.shape
    assert label.any() and len(np.unique(label)) > 4  # asymmetric organs: a flip would show
    np.testing.assert_array_equal(back, label)


def _agreement(back: np.ndarray, label: np.ndarray) -> tuple[float, bool]:
    """Share of labelled voxels recovered, and whether every miss lies on a boundary."""
    wrong = back != label
    edges = np.zeros(label.shape, bool)
    for v in np.unique(label):
        m = label == v
        edges |= m & ~ndimage.binary_erosion(m, iterations=1, border_value=1)
    edges = ndimage.binary_dilation(edges, iterations=1)
    recovered = float(np.mean(back[label > 0] == label[label > 0]))
    return recovered, not np.any(wrong & ~edges)


@pytest.mark.parametrize("kind", ["oblique", "lps", "anisotropic"])
def test_round_trip_at_another_spacing_is_exact_up_to_resampling(tmp_path, kind):
    img, lab, label, _ = _case(tmp_path, kind)
    back, grid = _round_trip(img, lab, (1.5, 1.5, 1.5))
    recovered, only_edges = _agreement(back, label)
    assert recovered > 0.75 and only_edges, (recovered, only_edges)
    # the check can fail: the same result one voxel off along any axis does not pass
    for axis in range(3):
        shifted = np.roll(back, 2, axis=axis)
        r, e = _agreement(shifted, label)
        assert not (r > 0.75 and e), f"a shift along axis {axis} went unnoticed"


def test_a_grid_that_mixes_axes_is_refused():
    prepared = np.eye(4)
    original = np.eye(4)
    original[:3, :3] = _rotation(30.0, 0.0)
    with pytest.raises(ValueError, match="mixes original axes"):
        GridMap.between((4, 4, 4), original, (4, 4, 4), prepared)
