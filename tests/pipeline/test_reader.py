import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.errors import ScanError
from pipeline.reader import read_scan

EXAMPLE_4D = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"


def _save(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _ramp(shape=(8, 9, 10)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_reads_nifti_with_affine(tmp_path):
    aff = np.diag([0.5, 0.7, 3.0, 1.0])
    raw = read_scan(_save(tmp_path / "a.nii.gz", _ramp(), aff))
    assert raw.data.shape == (8, 9, 10) and raw.data.dtype == np.float32
    np.testing.assert_allclose(raw.spacing, (0.5, 0.7, 3.0))
    np.testing.assert_array_equal(raw.data, _ramp())


def test_singleton_fourth_axis_is_accepted(tmp_path):
    raw = read_scan(_save(tmp_path / "a.nii", _ramp()[..., None]))
    assert raw.data.shape == (8, 9, 10)


def test_4d_series_is_refused():
    with pytest.raises(ScanError, match="4D image"):
        read_scan(EXAMPLE_4D)


def test_truncated_gzip_is_refused(tmp_path):
    good = _save(
        tmp_path / "good.nii.gz",
        np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32),
    )
    blob = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ScanError, match="truncated|corrupt") as err:
        read_scan(bad)
    assert err.value.path == str(bad)


def test_nan_values_are_refused(tmp_path):
    data = _ramp()
    data[1, 2, 3] = np.nan
    with pytest.raises(ScanError, match="1 of 720 voxels are NaN"):
        read_scan(_save(tmp_path / "nan.nii.gz", data))


def _write_raw_nifti(path: Path, hdr: nib.Nifti1Header, payload: bytes) -> Path:
    """Write header bytes as given (nibabel's writer would repair what we want broken)."""
    hdr["vox_offset"] = 352
    with open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\x00" * 4 + payload)
    return path


def test_zero_spacing_is_refused(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((8, 9, 10))
    hdr.set_data_dtype(np.float32)
    hdr["pixdim"][1:4] = (1.0, 0.0, 1.0)
    hdr["sform_code"] = 0
    hdr["qform_code"] = 0
    path = _write_raw_nifti(tmp_path / "zero.nii", hdr, _ramp().tobytes(order="F"))
    with pytest.raises(ScanError, match="spacing"):
        read_scan(path)


def test_empty_and_non_image_and_missing_files(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(ScanError, match="empty"):
        read_scan(empty)
    text = tmp_path / "notes.nii"
    text.write_text("this is not an image\n" * 50)
    with pytest.raises(ScanError, match="not a readable"):
        read_scan(text)
    with pytest.raises(ScanError, match="file not found"):
        read_scan(tmp_path / "missing.nii.gz")
    with pytest.raises(ScanError, match="unsupported file type"):
        read_scan(_save(tmp_path / "x.nii", _ramp()).rename(tmp_path / "x.png"))


def test_constant_image_is_refused(tmp_path):
    with pytest.raises(ScanError, match="constant"):
        read_scan(_save(tmp_path / "c.nii.gz", np.zeros((5, 5, 5), np.float32)))


def test_absurd_header_is_refused_before_allocation(tmp_path):
    """A 56-byte-data file whose header claims 30000^3 voxels must not allocate 100 TB."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.int16)
    hdr.set_zooms((1.0, 1.0, 1.0))
    path = _write_raw_nifti(tmp_path / "absurd.nii", hdr, b"\x00" * 56)
    with pytest.raises(ScanError, match="refusing to allocate"):
        read_scan(path)


def test_nrrd_via_simpleitk_is_lps_converted_to_ras(tmp_path):
    arr_zyx = _ramp((10, 9, 8))  # ITK arrays are [z, y, x]
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing((0.5, 0.6, 2.0))
    img.SetOrigin((10.0, 20.0, 30.0))
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(img, str(path))
    raw = read_scan(path)
    assert raw.data.shape == (8, 9, 10)
    np.testing.assert_array_equal(raw.data, arr_zyx.transpose(2, 1, 0))
    np.testing.assert_allclose(raw.spacing, (0.5, 0.6, 2.0))
    # LPS origin (10, 20, 30) is RAS (-10, -20, 30); x and y axes point to -R and -A.
    np.testing.assert_allclose(raw.affine[:3, 3], (-10.0, -20.0, 30.0))
    assert raw.affine[0, 0] < 0 and raw.affine[1, 1] < 0 and raw.affine[2, 2] > 0


def test_gzip_stream_of_real_scan_matches_nibabel(shared_data, tmp_path):
    src = shared_data / "mr_brain_aniso_4x4x5mm.nii.gz"
    plain = tmp_path / "plain.nii"
    with gzip.open(src) as fin, open(plain, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    a, b = read_scan(src), read_scan(plain)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.data.shape == (58, 58, 24)


def test_dicom_series_folder(tmp_path):
    """A DICOM series written slice by slice (as scanners export) reads back as one RAS volume."""
    vol = (np.arange(6 * 7 * 5).reshape(5, 7, 6) * 3 - 500).astype(np.int16)  # [z, y, x]
    series_uid = "1.2.826.0.1.3680043.2.1125.1.1"
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(vol.shape[0]):
        img = sitk.GetImageFromArray(vol[k : k + 1])
        img.SetSpacing((0.8, 0.9, 2.5))
        img.SetOrigin((0.0, 0.0, 2.5 * k))
        for tag, value in {
            "0020|000e": series_uid,
            "0020|0032": f"0\\0\\{2.5 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1),
            "0008|0060": "CT",
            "0018|0050": "2.5",
        }.items():
            img.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(img)
    raw = read_scan(folder)
    assert raw.data.shape == (6, 7, 5)
    np.testing.assert_allclose(raw.spacing, (0.8, 0.9, 2.5), atol=1e-3)
    np.testing.assert_array_equal(raw.data, vol.transpose(2, 1, 0).astype(np.float32))
