"""Read a scan from disk into a validated array (float32 or its integer dtype) plus its affine.

Validation happens on the header first, so an absurd or wrong-dimensional
file is refused before any voxel buffer is allocated; then on the data
(finite, not constant). Every refusal is a `ScanError` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.gzip_stream import GzipStream

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
# Plausible voxel sizes (mm). Outside this a header is broken, and resampling a 200 mm
# voxel to 1.5 mm would ask for a grid ~130x larger per axis than the file.
SPACING_RANGE_MM = (0.01, 50.0)
# Deflate adds ~0.03 % to incompressible data; a .nii.gz much larger than the data its
# header declares holds something else (trailing junk, a gzip bomb) and is refused unread.
_GZ_SLACK = 1.01
_GZ_OVERHEAD = 64 << 10
# Slice gaps of a DICOM series may differ by this fraction before the series is uneven.
_SLICE_TOLERANCE = 0.05


@dataclass(frozen=True)
class ScanHeader:
    """What a header says before any voxel is read: enough to size the work on the scan."""

    path: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    itemsize: int  # bytes per stored voxel
    file_bytes: int  # bytes of the file(s) read into memory besides the voxel buffer
    float_copy: bool  # the reader converts the voxels to a float32 copy


HeaderCheck = Callable[[ScanHeader], None]


@dataclass
class RawScan:
    """A scan as stored on disk (any orientation), already validated."""

    data: np.ndarray  # [i, j, k]: float32, or the file's integer dtype
    affine: np.ndarray  # 4x4 voxel -> world (RAS, mm)
    path: str
    sha256: str | None = None  # of the file's bytes, when the reader hashed them on the way
    pending: GzipStream | None = None  # still decoding (``read_scan(..., stream=True)``)
    offset: int = 0  # of ``data`` in ``pending.buffer``
    whole_file: bool = True  # ``pending`` saw every byte of the file (its hash is the file's)

    def wait(self, nbytes: int | None = None) -> None:
        """Block until the first ``nbytes`` of ``data``'s memory (default: all) are decoded."""
        if self.pending is not None:
            self.pending.wait(None if nbytes is None else self.offset + nbytes)

    def finish(self, check_values: bool = True) -> RawScan:
        """Wait for the whole decode (gzip CRC checked), then run the value checks."""
        if self.pending is not None:
            self.pending.wait()
            self.sha256 = self.pending.sha256 if self.whole_file else None
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


_DATA_FILE_KEYS = {".mhd": re.compile(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", re.I)}
_DATA_FILE_KEYS[".nhdr"] = re.compile(r"^\s*data\s?file\s*:\s*(.+?)\s*$", re.I)


def itk_data_file(path: str | Path) -> Path | None:
    """The data file a detached header (.mhd, .nhdr) names, checked to lie in its folder.

    Why: the voxels live in that file, so it is part of the scan's content (hashed with
    the header), and a header must not make the pipeline read files elsewhere on disk.
    None for other files and for inline (``LOCAL``) data.
    """
    path = Path(path)
    key = _DATA_FILE_KEYS.get(path.suffix.lower())
    if key is None:
        return None
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).decode("latin-1")
    for line in head.splitlines():
        match = key.match(line)
        if not match:
            continue
        name = match.group(1)
        if name.upper() == "LOCAL":
            return None
        if name.upper().startswith("LIST") or "%" in name or " " in name.strip():
            raise ScanError(
                path, f"header names several data files ({name!r}); write one data file"
            )
        folder = path.parent.resolve()
        data = (folder / name).resolve()
        if not data.is_relative_to(folder):
            raise ScanError(
                path,
                f"data file {name!r} lies outside the header's folder {folder}; "
                "put the data file next to its header",
            )
        if not data.is_file():
            raise ScanError(path, f"data file {name!r} named by the header is missing")
        return data
    return None


def sha256_of(path: str | Path) -> str:
    """Content hash of a file (with the data file of an .mhd/.nhdr header), or of every file
    in a DICOM folder, streamed in 1 MiB blocks."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        data = itk_data_file(path)
        files = [path] if data is None else [path, data]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _check_geometry(
    path: str,
    shape: tuple[int, ...],
    affine: np.ndarray,
    max_voxels: int,
    target: tuple[float, float, float] | None = None,
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
    lo, hi = SPACING_RANGE_MM
    if np.any(spacing < lo) or np.any(spacing > hi):
        raise ScanError(
            path,
            f"voxel spacing {tuple(round(float(v), 4) for v in spacing)} mm is outside "
            f"[{lo:g}, {hi:g}] mm; fix the header's voxel sizes",
        )
    if target is not None:
        from maskbank.pipeline.resample import output_shape

        out = output_shape(shape, tuple(spacing), target)
        n_out = int(np.prod(out, dtype=np.float64))
        if n_out > max_voxels:
            raise ScanError(
                path,
                f"resampling {shape} voxels of {tuple(round(float(v), 3) for v in spacing)} mm "
                f"to {tuple(target)} mm gives {out} = {n_out:,} voxels, above the limit of "
                f"{max_voxels:,}; refusing to allocate (check the header's voxel sizes)",
            )
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


def _read_nifti(
    path: str,
    max_voxels: int,
    check_values: bool,
    stream: bool,
    target: tuple[float, float, float] | None,
    on_header: HeaderCheck | None,
) -> RawScan:
    """Header through nibabel (refusals before any allocation), voxels through `GzipStream`.

    Faster than ``np.asarray(img.dataobj)``: the file is read once (and hashed
    from the same bytes), decompressed by ISA-L straight into the array's
    buffer, and the array keeps its stored dtype and (Fortran) order. Scaling
    (``scl_slope``/``scl_inter``) is applied as nibabel would; integer data
    without scaling stays integer (resampling casts a few planes at a time).
    Only ``vox_offset + nbytes`` are read of an uncompressed file, and a compressed
    one much larger than that is refused: memory follows the header, not the file.
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
    shape = _check_geometry(path, img.shape, img.affine, max_voxels, target)
    # The array proxy holds what nibabel itself would apply (the header object's
    # vox_offset reads 0 after loading; the proxy keeps the real one).
    proxy = img.dataobj
    dtype, offset = np.dtype(proxy.dtype), int(proxy.offset)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    declared = offset + nbytes
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    on_disk = os.path.getsize(path)
    if gz and on_disk > declared * _GZ_SLACK + _GZ_OVERHEAD:
        raise ScanError(
            path,
            f"compressed file is {on_disk:,} bytes but its header declares only {declared:,} "
            "bytes of image: it holds more than the image (trailing data or a gzip bomb); "
            "re-export the image",
        )
    slope, inter = float(proxy.slope), float(proxy.inter)
    float_copy = (
        slope != 1.0
        or inter != 0.0
        or dtype.kind not in "iuf"
        or dtype.itemsize > 4
        or dtype.byteorder == ">"
    )
    if on_header is not None:
        spacing = tuple(float(v) for v in np.linalg.norm(img.affine[:3, :3], axis=0))
        on_header(
            ScanHeader(path, shape, spacing, dtype.itemsize, on_disk if gz else 0, float_copy)  # type: ignore[arg-type]
        )
    # One read of the file (an OSError here is transient I/O: the flow retries); an
    # uncompressed .nii is read into a writable array that becomes the voxel buffer.
    if gz:
        blob: bytes | np.ndarray = Path(path).read_bytes()
    else:
        blob = np.fromfile(path, dtype=np.uint8, count=min(declared, on_disk))
        if blob.size < declared:
            raise ScanError(
                path,
                f"file ends at {on_disk:,} bytes but its header declares {declared:,} "
                f"({shape} {dtype} voxels from byte {offset:,}): the file is truncated",
            )
    pending = GzipStream(path, blob, declared)
    data = np.ndarray(shape, dtype=dtype, buffer=pending.buffer, offset=offset, order=proxy.order)
    raw = RawScan(data, np.asarray(img.affine, dtype=np.float64), path, None, pending, offset)
    raw.whole_file = gz or on_disk == declared
    if slope != 1.0 or inter != 0.0:
        raw.finish(check_values=False)
        raw.data = data.astype(np.float32) * np.float32(slope) + np.float32(inter)
    elif float_copy:
        raw.finish(check_values=False)
        raw.data = data.astype(np.float32)  # float64, (u)int64, big-endian -> float32
    if not stream:
        raw.finish(check_values)
    return raw


def _itk_affine(image) -> np.ndarray:
    """ITK geometry (LPS physical space) to a RAS voxel->world affine for [x, y, z] arrays.

    ``image`` is an image or an ``ImageFileReader`` after ``ReadImageInformation``."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _itk_itemsize(reader) -> int:
    import SimpleITK as sitk

    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    digits = re.findall(r"\d+", name)
    return max(1, int(digits[0]) // 8) if digits else 8


def _dicom_series(path: str, series: str | None) -> list[str]:
    """The files of the folder's one series (or the named one), in slice order."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = list(reader.GetGDCMSeriesIDs(path))
    if not ids:
        raise ScanError(path, "folder holds no DICOM series")
    if series is not None:
        if series not in ids:
            raise ScanError(
                path, f"series {series!r} is not in the folder (it holds {', '.join(ids)})"
            )
        chosen = series
    elif len(ids) > 1:
        counts = ", ".join(
            f"{uid} ({len(reader.GetGDCMSeriesFileNames(path, uid))} files)" for uid in ids
        )
        raise ScanError(
            path,
            f"folder holds {len(ids)} DICOM series: {counts}; name one (manifest column "
            "dicom_series) or give each series its own folder",
        )
    else:
        chosen = ids[0]
    return list(reader.GetGDCMSeriesFileNames(path, chosen))


def _check_dicom_slices(path: str, files: list[str], max_voxels: int, target, on_header) -> None:
    """Size and slice geometry from the slices' headers, before any pixel is read.

    Why: ITK silently stacks a series with a missing or doubled slice into a volume with
    one (wrong) spacing, and would allocate a huge series before anyone looks at it.
    """
    import SimpleITK as sitk

    info = sitk.ImageFileReader()
    positions, sizes = [], set()
    first_affine = None
    for name in files:
        info.SetFileName(name)
        info.ReadImageInformation()
        sizes.add(tuple(info.GetSize()[:2]))
        affine = _itk_affine(info)
        if first_affine is None:
            first_affine = affine
            normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
            itemsize = _itk_itemsize(info)
        positions.append(float(affine[:3, 3] @ normal))
    if len(sizes) > 1:
        raise ScanError(path, f"slices differ in size ({sorted(sizes)}); one series per folder")
    (cols, rows) = sizes.pop()
    shape = (int(cols), int(rows), len(files))
    if len(files) > 1:
        z = np.sort(np.asarray(positions))
        gaps = np.diff(z)
        step = float(np.median(gaps))
        if step <= 1e-6 or np.any(gaps <= 1e-6):
            dup = int(np.count_nonzero(gaps <= 1e-6))
            raise ScanError(
                path, f"{dup} slice(s) share a position with another slice; one series per folder"
            )
        uneven = np.abs(gaps - step) > _SLICE_TOLERANCE * step
        if np.any(uneven):
            i = int(np.argmax(np.abs(gaps - step)))
            raise ScanError(
                path,
                f"slices are unevenly spaced: gap of {gaps[i]:.3g} mm between positions "
                f"{z[i]:.3f} and {z[i + 1]:.3f} mm where the series steps {step:.3g} mm "
                f"({int(np.count_nonzero(uneven))} of {len(gaps)} gaps differ: missing slices?)",
            )
        first_affine = first_affine.copy()
        first_affine[:3, 2] = first_affine[:3, 2] / np.linalg.norm(first_affine[:3, 2]) * step
    _check_geometry(path, shape, first_affine, max_voxels, target)
    if on_header is not None:
        spacing = tuple(float(v) for v in np.linalg.norm(first_affine[:3, :3], axis=0))
        on_header(ScanHeader(path, shape, spacing, itemsize, 0, True))  # type: ignore[arg-type]


def _read_itk(
    path: str,
    max_voxels: int,
    check_values: bool,
    target: tuple[float, float, float] | None = None,
    on_header: HeaderCheck | None = None,
    series: str | None = None,
) -> RawScan:
    import SimpleITK as sitk

    try:
        if Path(path).is_dir():
            files = _dicom_series(path, series)
            _check_dicom_slices(path, files, max_voxels, target, on_header)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            itk_data_file(path)  # a detached data file must lie beside its header
            info = sitk.ImageFileReader()
            info.SetFileName(path)
            info.ReadImageInformation()
            size = info.GetSize()
            if int(np.prod(size, dtype=np.float64)) > max_voxels:
                raise ScanError(
                    path, f"header declares {size} voxels, above the limit of {max_voxels:,}"
                )
            if info.GetDimension() == 3 and info.GetNumberOfComponents() == 1:
                affine = _itk_affine(info)
                shape = _check_geometry(path, size, affine, max_voxels, target)
                if on_header is not None:
                    spacing = tuple(float(v) for v in info.GetSpacing())
                    on_header(ScanHeader(path, shape, spacing, _itk_itemsize(info), 0, True))  # type: ignore[arg-type]
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
    _check_geometry(path, image.GetSize(), affine, max_voxels, target)
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
    target_spacing: tuple[float, float, float] | None = None,
    on_header: HeaderCheck | None = None,
    series: str | None = None,
) -> RawScan:
    """Read and validate a NIfTI, NRRD, MetaImage file or DICOM series folder.

    ``check_values=False`` skips the finite/non-constant checks (for label maps).
    ``stream=True`` returns as soon as the header is validated, with a NIfTI's
    voxels still decoding in a background thread: use ``raw.wait(nbytes)`` before
    touching memory and call ``raw.finish(check_values)`` before trusting values.
    ``target_spacing`` also caps the grid resampling will make at ``max_voxels``;
    ``on_header`` sees the `ScanHeader` before any voxel buffer exists (and may raise
    `ScanError` to refuse the scan, e.g. over a memory budget). ``series`` names the
    DICOM series to read from a folder that holds several.
    """
    p = Path(path)
    spath = str(path)
    if not p.exists():
        raise ScanError(spath, "file not found")
    if p.is_file() and p.stat().st_size == 0:
        raise ScanError(spath, "file is empty (0 bytes)")
    name = p.name.lower()
    target = None if target_spacing is None else tuple(float(v) for v in target_spacing)
    if p.is_dir():
        return _read_itk(spath, max_voxels, check_values, target, on_header, series)  # type: ignore[arg-type]
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(spath, max_voxels, check_values, stream, target, on_header)  # type: ignore[arg-type]
    if name.endswith(ITK_SUFFIXES):
        return _read_itk(spath, max_voxels, check_values, target, on_header)  # type: ignore[arg-type]
    raise ScanError(
        spath,
        f"unsupported file type; expected one of {', '.join(SCAN_SUFFIXES)} or a DICOM folder",
    )
