"""Read a scan from disk into a validated array (float32 or its integer dtype) plus its affine.

Validation happens on the header first, so an absurd or wrong-dimensional
file is refused before any voxel buffer is allocated; then on the data
(finite, not constant). Every refusal is a `ScanError` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ScanError
from pipeline.gzip_stream import GzipStream

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


@dataclass
class RawScan:
    """A scan as stored on disk (any orientation), already validated."""

    data: np.ndarray  # [i, j, k]: float32, or the file's integer dtype
    affine: np.ndarray  # 4x4 voxel -> world (RAS, mm)
    path: str
    sha256: str | None = None  # of the file's bytes, when the reader hashed them on the way
    pending: GzipStream | None = None  # still decoding (``read_scan(..., stream=True)``)
    offset: int = 0  # of ``data`` in ``pending.buffer``

    def wait(self, nbytes: int | None = None) -> None:
        """Block until the first ``nbytes`` of ``data``'s memory (default: all) are decoded."""
        if self.pending is not None:
            self.pending.wait(None if nbytes is None else self.offset + nbytes)

    def finish(self, check_values: bool = True) -> RawScan:
        """Wait for the whole decode (gzip CRC checked), then run the value checks."""
        if self.pending is not None:
            self.pending.wait()
            self.sha256 = self.pending.sha256
            self.pending = None
        if check_values:
            _check_data(self.path, self.data)
        return self

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def is_scan_path(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(SCAN_SUFFIXES)


def is_dicom_dir(path: Path) -> bool:
    """A folder holding a DICOM series (files ending .dcm, or named by number as PACS exports do)."""
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir() if p.is_file())


def sha256_of(path: str | Path) -> str:
    """Content hash of a file, or of every file in a DICOM folder, streamed in 1 MiB blocks."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _check_geometry(
    path: str, shape: tuple[int, ...], affine: np.ndarray, max_voxels: int
) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        raise ScanError(
            path, f"4D image with {shape[3]} volumes (shape {shape}); give one 3D volume per file"
        )
    if len(shape) != 3:
        raise ScanError(path, f"expected a 3D image, got {len(shape)}D with shape {shape}")
    if min(shape) < 1:
        raise ScanError(path, f"empty image: shape {shape}")
    n_voxels = int(np.prod(shape, dtype=np.float64))
    if n_voxels > max_voxels:
        raise ScanError(
            path,
            f"header declares {shape} = {n_voxels:,} voxels, above the limit of {max_voxels:,}; refusing to allocate",
        )
    if not np.all(np.isfinite(affine)):
        raise ScanError(path, "affine contains NaN or infinite values")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 1e-6):
        raise ScanError(path, f"non-positive voxel spacing {tuple(np.round(spacing, 6))}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ScanError(path, "singular affine (voxel axes are not independent)")
    return shape  # type: ignore[return-value]


def _check_data(path: str, data: np.ndarray) -> np.ndarray:
    if data.dtype.kind == "f":  # integers cannot be NaN: skip a whole-volume pass
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(data.size - np.count_nonzero(finite))
            raise ScanError(path, f"{bad:,} of {data.size:,} voxels are NaN or infinite")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise ScanError(path, f"image is constant (every voxel = {lo:g}): nothing to learn from")
    return data


def _raw_nifti_zooms(path: str, img) -> tuple[float, ...]:
    """Voxel sizes exactly as written: nibabel silently turns a 0 pixdim into 1 on load."""
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as fh:
        raw = type(img.header).from_fileobj(fh, check=False)
    ndim = max(1, min(3, int(raw["dim"][0])))
    return tuple(float(z) for z in raw["pixdim"][1 : 1 + ndim])


def _read_nifti(path: str, max_voxels: int, check_values: bool, stream: bool) -> RawScan:
    """Header through nibabel (refusals before any allocation), voxels through `GzipStream`.

    Faster than ``np.asarray(img.dataobj)``: the file is read once (and hashed
    from the same bytes), decompressed by ISA-L straight into the array's
    buffer, and the array keeps its stored dtype and (Fortran) order. Scaling
    (``scl_slope``/``scl_inter``) is applied as nibabel would; integer data
    without scaling stays integer (resampling casts a few planes at a time).
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(path)
    except ImageFileError as exc:
        raise ScanError(path, f"not a readable NIfTI image ({exc})") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise ScanError(path, f"corrupt or truncated header ({type(exc).__name__}: {exc})") from exc
    zooms = _raw_nifti_zooms(path, img)
    if any(float(z) <= 0 or not np.isfinite(z) for z in zooms):
        raise ScanError(
            path, f"non-positive voxel spacing in header: {tuple(float(z) for z in zooms)}"
        )
    shape = _check_geometry(path, img.shape, img.affine, max_voxels)
    # The array proxy holds what nibabel itself would apply (the header object's
    # vox_offset reads 0 after loading; the proxy keeps the real one).
    proxy = img.dataobj
    dtype, offset = np.dtype(proxy.dtype), int(proxy.offset)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    # One read of the file (an OSError here is transient I/O: the flow retries); an
    # uncompressed .nii is read into a writable array that becomes the voxel buffer.
    blob = np.fromfile(path, dtype=np.uint8) if path.endswith(".nii") else Path(path).read_bytes()
    pending = GzipStream(path, blob, offset + nbytes)
    data = np.ndarray(shape, dtype=dtype, buffer=pending.buffer, offset=offset, order=proxy.order)
    raw = RawScan(data, np.asarray(img.affine, dtype=np.float64), path, None, pending, offset)
    slope, inter = float(proxy.slope), float(proxy.inter)
    if slope != 1.0 or inter != 0.0:
        raw.finish(check_values=False)
        raw.data = data.astype(np.float32) * np.float32(slope) + np.float32(inter)
    elif dtype.kind not in "iuf" or dtype.itemsize > 4 or dtype.byteorder == ">":
        raw.finish(check_values=False)
        raw.data = data.astype(np.float32)  # float64, (u)int64, big-endian -> float32
    if not stream:
        raw.finish(check_values)
    return raw


def _itk_affine(image) -> np.ndarray:
    """ITK geometry (LPS physical space) to a RAS voxel->world affine for [x, y, z] arrays."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _read_itk(path: str, max_voxels: int, check_values: bool) -> RawScan:
    import SimpleITK as sitk

    try:
        if Path(path).is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(path)
            if not series:
                raise ScanError(path, "folder holds no DICOM series")
            files = reader.GetGDCMSeriesFileNames(path, series[0])
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            info = sitk.ImageFileReader()
            info.SetFileName(path)
            info.ReadImageInformation()
            size = info.GetSize()
            if int(np.prod(size, dtype=np.float64)) > max_voxels:
                raise ScanError(
                    path, f"header declares {size} voxels, above the limit of {max_voxels:,}"
                )
            image = info.Execute()
    except RuntimeError as exc:
        raise ScanError(
            path, f"not a readable image ({str(exc).strip().splitlines()[-1][:200]})"
        ) from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ScanError(
            path, f"vector image with {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    if image.GetDimension() != 3:
        raise ScanError(path, f"expected a 3D image, got {image.GetDimension()}D")
    affine = _itk_affine(image)
    _check_geometry(path, image.GetSize(), affine, max_voxels)
    data = np.ascontiguousarray(sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0))
    if check_values:
        _check_data(path, data)
    return RawScan(data, affine, path)


def read_scan(
    path: str | Path,
    max_voxels: int = 1_500_000_000,
    check_values: bool = True,
    *,
    stream: bool = False,
) -> RawScan:
    """Read and validate a NIfTI, NRRD, MetaImage file or DICOM series folder.

    ``check_values=False`` skips the finite/non-constant checks (for label maps).
    ``stream=True`` returns as soon as the header is validated, with a NIfTI's
    voxels still decoding in a background thread: use ``raw.wait(nbytes)`` before
    touching memory and call ``raw.finish(check_values)`` before trusting values.
    """
    p = Path(path)
    spath = str(path)
    if not p.exists():
        raise ScanError(spath, "file not found")
    if p.is_file() and p.stat().st_size == 0:
        raise ScanError(spath, "file is empty (0 bytes)")
    name = p.name.lower()
    if p.is_dir():
        return _read_itk(spath, max_voxels, check_values)
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(spath, max_voxels, check_values, stream)
    if name.endswith(ITK_SUFFIXES):
        return _read_itk(spath, max_voxels, check_values)
    raise ScanError(
        spath,
        f"unsupported file type; expected one of {', '.join(SCAN_SUFFIXES)} or a DICOM folder",
    )
