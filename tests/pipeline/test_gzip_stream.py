"""Streamed decoding: same voxels as nibabel, errors surface, resampling overlaps decoding."""

import gzip
import hashlib

import nibabel as nib
import numpy as np
import pytest

from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.gzip_stream import GzipStream
from maskbank.pipeline.reader import read_scan
from maskbank.pipeline.resample import resample


def _save(path, data, slope=None):
    img = nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.5, 1.0]))
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nib.save(img, path)
    return path


@pytest.mark.parametrize(
    ("dtype", "slope"), [(np.int16, None), (np.float32, None), (np.int16, (0.5, -1024.0))]
)
def test_streamed_read_matches_nibabel(tmp_path, dtype, slope):
    data = np.random.default_rng(0).integers(-1000, 1000, size=(33, 20, 17)).astype(dtype)
    path = _save(tmp_path / "a.nii.gz", data, slope)
    raw = read_scan(path, stream=True)
    raw.finish()
    expected = np.asarray(nib.load(path).dataobj)
    np.testing.assert_array_equal(np.asarray(raw.data, np.float64), expected.astype(np.float64))
    # Integer data without scaling keeps its dtype (resampling casts it plane block by block).
    assert raw.data.dtype == (np.float32 if slope else dtype)
    assert raw.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_uncompressed_nifti_streams_too(tmp_path):
    data = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    path = _save(tmp_path / "a.nii", data)
    raw = read_scan(path)
    np.testing.assert_array_equal(raw.data, data)
    assert raw.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert raw.data.flags.writeable  # the file's own buffer: torch can wrap it without a copy


def test_corrupt_payload_fails_at_finish_not_silently(tmp_path):
    """A flipped byte deep in the deflate stream: a zlib error or the gzip CRC catches it."""
    data = np.random.default_rng(1).normal(size=(60, 60, 40)).astype(np.float32)
    path = _save(tmp_path / "a.nii.gz", data)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    raw = read_scan(path, stream=True)
    with pytest.raises(ScanError, match="truncated or corrupt") as err:
        raw.finish()
    assert err.value.path == str(path)


def test_truncated_stream_raises_on_wait_beyond_the_end(tmp_path):
    payload = np.random.default_rng(2).bytes(3 << 20)
    blob = gzip.compress(payload)[:200_000]
    stream = GzipStream("x.gz", blob, len(payload))
    with pytest.raises(ScanError, match="truncated or corrupt"):
        stream.wait()


def test_partial_wait_returns_the_decoded_prefix():
    payload = np.random.default_rng(3).bytes(9 << 20)  # > two progress steps
    stream = GzipStream("x.gz", gzip.compress(payload, compresslevel=1), len(payload))
    stream.wait(1000)
    assert bytes(stream.buffer[:1000]) == payload[:1000]
    stream.wait()
    assert bytes(stream.buffer) == payload


def test_resample_waits_for_planes_in_order_and_matches_the_plain_result(tmp_path):
    data = np.random.default_rng(4).integers(-1000, 1000, size=(64, 48, 40)).astype(np.int16)
    path = _save(tmp_path / "a.nii.gz", data)
    raw = read_scan(path, stream=True)
    asked: list[int | None] = []

    def wait(nbytes):
        asked.append(nbytes)
        raw.wait(nbytes)

    out, aff = resample(raw.data, raw.affine, (1.5, 1.5, 1.5), wait=wait)
    raw.finish()
    ref, ref_aff = resample(np.asarray(nib.load(path).dataobj), raw.affine, (1.5, 1.5, 1.5))
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_allclose(aff, ref_aff)
    plane = 64 * 48 * 2  # bytes of one z-plane of the Fortran-ordered int16 volume
    assert asked == sorted(asked) and asked[-1] == 40 * plane and asked[0] < 40 * plane


def test_drain_past_the_declared_data_stops_at_the_cap(tmp_path):
    """4 KiB of data followed by 8 MiB of zeros: refused once 1 MiB past the end is seen."""
    import io

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as fh:
        fh.write(bytes(range(256)) * 16)
        for _ in range(8):
            fh.write(bytes(1 << 20))
    stream = GzipStream("bomb.nii.gz", buf.getvalue(), 4096, max_trailing=1 << 20)
    with pytest.raises(ScanError, match="past the 4,096 bytes its header declares"):
        stream.wait()
    assert bytes(stream.buffer[:256]) == bytes(range(256))
