"""`maskbank segment` as a subprocess on a DICOM series: written on the series' own grid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.reader import read_scan

from .cli_run import maskbank
from .segment.conftest import write_checkpoint


def _write_dicom(folder, volume_zyx: np.ndarray, spacing=(1.8, 2.0, 2.5)) -> None:
    """One file per slice, as scanners export (LPS, axial, rows along y)."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.9.1"
    for k in range(volume_zyx.shape[0]):
        img = sitk.GetImageFromArray(volume_zyx[k : k + 1])
        img.SetSpacing(spacing)
        z = -40.0 + spacing[2] * k
        img.SetOrigin((-60.0, -50.0, z))
        for tag, value in {
            "0020|000e": uid,
            "0020|0032": f"-60\\-50\\{z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1),
            "0008|0060": "CT",
            "0018|0050": str(spacing[2]),
        }.items():
            img.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(img)


def test_segment_cli_on_a_dicom_series(tmp_path):
    run = write_checkpoint(tmp_path / "run", seed=0)
    ref_img, ref_lab = make_phantom("ct", shape=(40, 36, 28), spacing=(2, 2, 2), seed=0).save_nifti(
        tmp_path / "ref", "ref"
    )
    ph = make_phantom("ct", shape=(44, 40, 24), spacing=(1.8, 2.0, 2.5), seed=5)
    series = tmp_path / "series"
    _write_dicom(series, np.round(ph.image).astype(np.int16).transpose(2, 1, 0))
    raw = read_scan(series)
    # the same voxels and geometry as a NIfTI file: the two results must agree
    twin = tmp_path / "twin" / "twin.nii.gz"
    twin.parent.mkdir()
    nib.save(nib.Nifti1Image(raw.data.astype(np.int16), raw.affine), twin)
    out = tmp_path / "out"
    args = ["segment", "--checkpoint", str(run), "--reference", str(ref_img), str(ref_lab)]
    args += ["--labels", "3,5", "--spacing", "2", "--out", str(out), "--no-progress"]
    done = maskbank(*args, str(series), str(twin))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 of 2 queries segmented" in done.stderr
    seg = nib.load(out / "series_seg.nii.gz")
    assert seg.shape == raw.data.shape == (44, 40, 24)
    np.testing.assert_allclose(seg.affine, raw.affine, atol=1e-4)
    assert raw.affine[0, 0] < 0 and raw.affine[1, 1] < 0  # LPS storage, RAS affine
    labels = np.asarray(seg.dataobj)
    twin_labels = np.asarray(nib.load(out / "twin_seg.nii.gz").dataobj)
    # the same up to float rounding (the two readers hand over different memory orders,
    # so the separable resampling runs its passes in another order)
    assert np.mean(labels == twin_labels) > 0.999
    assert set(np.unique(labels)) <= {0, 3, 5}
    record = json.loads((out / "series_seg.json").read_text())
    assert record["source"] == str(series) and record["modality"] == "ct"
    assert set(record["voxels"]) == {"3", "5"}
