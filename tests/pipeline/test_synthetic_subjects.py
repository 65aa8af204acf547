"""Deformed subjects: same classes, a nearby but different label map, deterministic per seed."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.synthetic_subjects import deformed_subject, write_deformed_subject

SPACING = (2.0, 2.0, 2.5)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom("ct", shape=(64, 64, 48), spacing=SPACING, seed=1)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_same_classes_close_but_changed(phantom) -> None:
    image, label = deformed_subject(phantom.image, phantom.labels, SPACING, seed=1)
    assert image.shape == phantom.image.shape and image.dtype == np.float32
    assert label.dtype == phantom.labels.dtype
    assert set(np.unique(label)) == set(np.unique(phantom.labels))
    assert not np.array_equal(label, phantom.labels)
    for v in (1, 3, 7):  # a lung, the liver, the spine
        assert 0.7 < _dice(label == v, phantom.labels == v) < 1.0
    # New intensities, same anatomy: the liver stays brighter than the lungs.
    assert image[label == 3].mean() > image[label == 1].mean() + 500
    assert not np.allclose(image[label == 3].mean(), phantom.image[phantom.labels == 3].mean())


def test_deterministic_per_seed(phantom) -> None:
    a_img, a_lab = deformed_subject(phantom.image, phantom.labels, SPACING, seed=4)
    b_img, b_lab = deformed_subject(phantom.image, phantom.labels, SPACING, seed=4)
    c_img, c_lab = deformed_subject(phantom.image, phantom.labels, SPACING, seed=5)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_lab, c_lab) and not np.allclose(a_img, c_img)


def test_displacement_stays_within_the_bound(phantom) -> None:
    """A single bright voxel moves by at most max_displacement_mm."""
    image = np.zeros((40, 40, 40), np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[20, 20, 20] = 1
    for seed in range(3):
        _, moved = deformed_subject(image, label, (1.0, 1.0, 1.0), seed, max_displacement_mm=3.0)
        where = np.argwhere(moved == 1)
        assert len(where) >= 1
        assert np.abs(where - 20).max() <= 3 + 1  # + 1: nearest-neighbour rounding


def test_written_subject_keeps_affine_and_dtype(phantom, tmp_path: Path) -> None:
    img_path, lab_path = phantom.save_nifti(tmp_path / "src", "case")
    out_img, out_lab = write_deformed_subject(img_path, lab_path, tmp_path / "out", "case_s1", 1)
    assert out_img == tmp_path / "out" / "case_s1.nii.gz"
    src, img, lab = nib.load(img_path), nib.load(out_img), nib.load(out_lab)
    assert np.allclose(img.affine, src.affine) and np.allclose(lab.affine, src.affine)
    assert img.get_data_dtype() == np.int16  # CT stays integer HU
    labels = np.asarray(lab.dataobj)
    assert set(np.unique(labels)) == set(np.unique(phantom.labels))
    assert not list((tmp_path / "out").glob(".*partial*"))


def test_rejects_mismatched_grids(phantom) -> None:
    with pytest.raises(ValueError, match="one 3-D grid"):
        deformed_subject(phantom.image, phantom.labels[:-1], SPACING, seed=0)
