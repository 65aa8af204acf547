"""pipeline.mask_import: masks on the source grid land exactly where prepare put the scan."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.mask_import import imported_set, mask_files, on_bank_grid, pack_binary
from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.prepare import prepare_scan


@pytest.fixture(scope="module")
def lps_scan(tmp_path_factory):
    """A CT phantom saved LPS-oriented with anisotropic voxels, prepared at 1.5 mm."""
    d = tmp_path_factory.mktemp("import")
    ph = make_phantom("ct", shape=(72, 64, 30), spacing=(1.0, 1.2, 2.5), seed=3)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    n = np.array(ph.image.shape)
    affine = flip @ ph.affine
    affine[:3, 3] = (flip @ ph.affine @ np.r_[n - 1, 1.0])[:3] * np.r_[1, 1, 0] + np.r_[
        0, 0, ph.affine[2, 3]
    ]
    image = ph.image[::-1, ::-1, :]
    labels = ph.labels[::-1, ::-1, :]
    nib.save(nib.Nifti1Image(image, affine), d / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint16), affine), d / "labels.nii.gz")
    organs = d / "organs"
    organs.mkdir()
    values = [int(v) for v in np.unique(labels) if v]
    for v in values:
        nib.save(nib.Nifti1Image((labels == v).astype(np.uint8), affine), organs / f"o{v}.nii.gz")
    prepared = prepare_scan(d / "ct.nii.gz", d / "labels.nii.gz", config=PrepareConfig())
    return d, prepared, values


def test_a_label_map_lands_on_the_prepared_label(lps_scan):
    d, prepared, _ = lps_scan
    grid = on_bank_grid(d / "labels.nii.gz", prepared.attrs)
    assert grid.shape == prepared.label.shape
    assert np.array_equal(grid, prepared.label)


def test_binary_masks_become_one_proposal_each(lps_scan):
    d, prepared, values = lps_scan
    files = mask_files(d / "organs")
    assert len(files) == len(values)
    ps = imported_set(files, prepared.attrs, source="organs")
    assert ps.count == len(values)
    assert len(ps.layers) < len(values)  # non-overlapping organs share layers
    rebuilt = sorted(int(ps.mask(i).sum()) for i in range(ps.count))
    expected = sorted(int((prepared.label == v).sum()) for v in values)
    assert rebuilt == expected


def test_a_mask_on_another_grid_is_refused(lps_scan, tmp_path):
    _, prepared, _ = lps_scan
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), tmp_path / "m.nii.gz")
    with pytest.raises(ScanError, match="differs from its scan"):
        on_bank_grid(tmp_path / "m.nii.gz", prepared.attrs)
    with pytest.raises(ScanError, match="no such mask"):
        mask_files(tmp_path / "absent")


def test_pack_binary_keeps_overlaps_apart():
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    b = np.zeros_like(a)
    b[1:3] = True  # overlaps a
    c = np.zeros_like(a)
    c[3] = True  # overlaps neither
    layers = pack_binary([a, b, c])
    assert len(layers) == 2
    assert set(np.unique(layers[0])) == {0, 1, 2} and set(np.unique(layers[1])) == {0, 1}
