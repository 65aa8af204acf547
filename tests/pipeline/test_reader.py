import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.reader import read_scan

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


# --- hostile files: memory follows the header, never the file -------------------------


def test_truncated_uncompressed_nifti_is_a_scan_error(tmp_path):
    full = _save(tmp_path / "full.nii", _ramp()).read_bytes()
    cut = tmp_path / "cut.nii"
    cut.write_bytes(full[:-500])
    with pytest.raises(ScanError, match="truncated") as err:
        read_scan(cut)
    assert err.value.path == str(cut) and f"{len(full) - 500:,}" in err.value.reason


def test_uncompressed_nifti_reads_only_the_declared_bytes(tmp_path):
    """Trailing junk after the voxels is neither read nor taken for the file's hash."""
    path = _save(tmp_path / "a.nii", _ramp())
    with open(path, "ab") as fh:
        fh.write(b"\xff" * 10_000)
    raw = read_scan(path)
    np.testing.assert_array_equal(raw.data, _ramp())
    assert raw.pending is None and raw.sha256 is None  # not the hash of the whole file


def test_gzip_holding_far_more_than_declared_is_refused_unread(tmp_path):
    """A valid 16^3 NIfTI followed by 64 MiB of compressed zeros (a ~70 KB file)."""
    body = nib.Nifti1Image(_ramp((16, 16, 16)), np.eye(4)).to_bytes()
    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(body)
        zeros = bytes(1 << 20)
        for _ in range(64):
            fh.write(zeros)
    with pytest.raises(ScanError, match="gzip bomb") as err:
        read_scan(bomb)
    assert f"{len(body):,}" in err.value.reason


def _grid_nifti(path: Path, spacing: float, shape=(64, 64, 64)) -> Path:
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    return _save(path, data, np.diag([spacing, spacing, spacing, 1.0]))


def test_spacing_outside_the_plausible_range_is_refused(tmp_path):
    with pytest.raises(ScanError, match=r"outside \[0.01, 50\] mm"):
        read_scan(_grid_nifti(tmp_path / "huge.nii.gz", 200.0, (16, 16, 16)))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_output_grid_is_limited_before_allocating(tmp_path, suffix):
    """64^3 voxels of 40 mm resampled to 0.1 mm would be 25,600^3 voxels."""
    src = _grid_nifti(tmp_path / "src.nii.gz", 40.0)
    path = src
    if suffix != ".nii.gz":
        path = tmp_path / f"grid{suffix}"
        sitk.WriteImage(sitk.ReadImage(str(src)), str(path))
    read_scan(path, target_spacing=(40.0, 40.0, 40.0))  # the same grid is fine
    with pytest.raises(ScanError, match="refusing to allocate") as err:
        read_scan(path, target_spacing=(0.1, 0.1, 0.1))
    assert "(25600, 25600, 25600)" in err.value.reason


def _dicom(folder: Path, positions, uid="1.2.826.0.1.3680043.2.1125.7.1", shape=(7, 6)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    rng = np.random.default_rng(len(positions))
    for k, z in enumerate(positions):
        img = sitk.GetImageFromArray(rng.integers(-500, 500, (1, *shape)).astype(np.int16))
        img.SetSpacing((0.8, 0.9, 2.5))
        img.SetOrigin((0.0, 0.0, float(z)))
        for tag, value in {
            "0020|000e": uid,
            "0020|0032": f"0\\0\\{float(z)}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1),
            "0008|0060": "CT",
        }.items():
            img.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-3:]}-{k:03d}.dcm"))
        writer.Execute(img)
    return folder


def test_dicom_missing_slice_is_refused_with_the_gap(tmp_path):
    folder = _dicom(tmp_path / "gap", [0.0, 2.5, 5.0, 10.0, 12.5])  # 7.5 missing
    with pytest.raises(ScanError, match="unevenly spaced") as err:
        read_scan(folder)
    assert "gap of 5 mm between positions 5.000 and 10.000" in err.value.reason


def test_dicom_folder_with_two_series_needs_a_name(tmp_path):
    folder = _dicom(tmp_path / "two", [0.0, 2.5, 5.0], uid="1.2.826.0.1.3680043.2.1125.7.1")
    _dicom(folder, [0.0, 3.0, 6.0, 9.0], uid="1.2.826.0.1.3680043.2.1125.7.2")
    with pytest.raises(ScanError, match="2 DICOM series") as err:
        read_scan(folder)
    assert "(4 files)" in err.value.reason and "(3 files)" in err.value.reason
    raw = read_scan(folder, series="1.2.826.0.1.3680043.2.1125.7.2")
    assert raw.data.shape == (6, 7, 4)
    np.testing.assert_allclose(raw.spacing, (0.8, 0.9, 3.0), atol=1e-3)


def test_dicom_size_is_checked_before_reading_pixels(tmp_path):
    folder = _dicom(tmp_path / "big", [0.0, 2.5, 5.0])
    seen = []
    with pytest.raises(ScanError, match="refusing to allocate"):
        read_scan(folder, max_voxels=100, on_header=seen.append)
    raw = read_scan(folder, on_header=seen.append)
    assert seen[0].shape == raw.data.shape == (6, 7, 3) and seen[0].itemsize == 2


def _mhd(folder: Path, data_file: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = folder / "scan.mhd"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 8 9 10\nElementSpacing = 1 1 1\n"
        f"ElementType = MET_FLOAT\nElementDataFile = {data_file}\n"
    )
    return header


def test_mhd_hash_covers_its_data_file(tmp_path):
    from maskbank.pipeline.reader import sha256_of

    header = _mhd(tmp_path / "scan", "scan.raw")
    (tmp_path / "scan" / "scan.raw").write_bytes(_ramp((10, 9, 8)).tobytes())
    before = sha256_of(header)
    np.testing.assert_array_equal(read_scan(header).data, _ramp((10, 9, 8)).transpose(2, 1, 0))
    (tmp_path / "scan" / "scan.raw").write_bytes((_ramp((10, 9, 8)) * 2).tobytes())
    assert sha256_of(header) != before


def test_mhd_data_file_outside_its_folder_is_refused(tmp_path):
    (tmp_path / "secret.raw").write_bytes(_ramp((10, 9, 8)).tobytes())
    header = _mhd(tmp_path / "scan", "../secret.raw")
    with pytest.raises(ScanError, match="outside the header's folder"):
        read_scan(header)
    from maskbank.pipeline.reader import sha256_of

    with pytest.raises(ScanError, match="outside the header's folder"):
        sha256_of(header)
