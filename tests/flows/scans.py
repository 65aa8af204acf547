"""Small real input files for flow tests: phantom NIfTIs and deliberately broken scans."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from maskbank.bank import Bank
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.prepare import prepare_scan

SMALL = (48, 48, 40)
SMALL_SPACING = (3.0, 3.0, 3.0)


def write_phantom(
    folder: Path, name: str, modality: str = "ct", seed: int = 0
) -> tuple[Path, Path]:
    """A ~48^3 torso phantom and its label, as `<name>.nii.gz` and `<name>_label.nii.gz`."""
    ph = make_phantom(modality, shape=SMALL, spacing=SMALL_SPACING, seed=seed)
    return ph.save_nifti(folder, name)


def phantom_bank(root: Path, inputs: str, dataset: str, names=("a", "b", "c")) -> Path:
    """A bank at ``root/bank`` of phantom scans prepared at 3 mm (seed = position in
    ``names``); their source NIfTI files, images and label maps, in ``root/inputs``."""
    bank = Bank.create(root / "bank")
    config = PrepareConfig(spacing=(3.0, 3.0, 3.0))
    for i, name in enumerate(names):
        img, lab = write_phantom(root / inputs, name, seed=i)
        prepared = prepare_scan(img, lab, config=config, dataset=dataset)
        bank.write_scan(name, prepared.arrays(), prepared.attrs)
    return root / "bank"


def write_bad_inputs(folder: Path) -> dict[str, Path]:
    """One file per way a scan can be unusable; keys name the defect."""
    folder.mkdir(parents=True, exist_ok=True)
    good, _ = write_phantom(folder / "src", "src", seed=9)
    bad: dict[str, Path] = {}

    raw = good.read_bytes()
    bad["truncated"] = folder / "truncated.nii.gz"
    bad["truncated"].write_bytes(raw[: len(raw) // 2])

    example4d = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    bad["4d"] = folder / "series4d.nii.gz"
    shutil.copyfile(example4d, bad["4d"])

    data = np.asarray(nib.load(good).dataobj, dtype=np.float32)
    data[10:20, 10:20, 10:20] = np.nan
    bad["nan"] = folder / "with_nans.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0])), bad["nan"])

    noise = np.random.default_rng(0).normal(0, 100, (16, 16, 16)).astype(np.float32)
    bad["zero_spacing"] = folder / "zero_spacing.nii"
    nib.save(nib.Nifti1Image(noise, np.eye(4)), bad["zero_spacing"])
    with open(bad["zero_spacing"], "r+b") as fh:  # pixdim[2] = 0 (nibabel won't write it)
        fh.seek(76 + 2 * 4)
        fh.write(np.float32(0.0).tobytes())

    bad["empty"] = folder / "empty.nii.gz"
    bad["empty"].write_bytes(b"")

    bad["not_an_image"] = folder / "notes.nii.gz"
    with gzip.open(bad["not_an_image"], "wb") as fh:
        fh.write(b"this is a text file, not a NIfTI image\n" * 20)

    # A valid header declaring 30000^3 float32 voxels (108 TB) followed by a few bytes.
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_zooms((1.0, 1.0, 1.0))
    bad["absurd_size"] = folder / "absurd_size.nii"
    bad["absurd_size"].write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 64)
    shutil.rmtree(folder / "src")
    return bad


def write_dicom_series(folder: Path, modality: str = "ct", seed: int = 5) -> Path:
    """A phantom as a real DICOM series (one .dcm per axial slice, positions set per slice)."""
    import SimpleITK as sitk

    ph = make_phantom(modality, shape=SMALL, spacing=SMALL_SPACING, seed=seed)
    # [x, y, z] RAS -> ITK: numpy [z, y, x] in LPS with direction diag(-1, -1, 1)
    image = sitk.GetImageFromArray(np.round(ph.image).astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing(SMALL_SPACING)
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1." + str(seed)
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        for tag, value in (
            ("0008|0060", modality.upper() if modality != "mr" else "MR"),
            ("0020|000e", series_uid),
            ("0020|0013", str(k + 1)),
            (
                "0020|0032",
                "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            ),
            ("0020|0037", "-1\\0\\0\\0\\-1\\0"),
            ("0018|0050", str(SMALL_SPACING[2])),
        ):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def write_gzip_bomb(path: Path, zeros_gib: float = 2.5) -> Path:
    """A valid 16^3 `.nii.gz` followed by `zeros_gib` GiB of zeros, a few MB on disk.

    Built from gzip members (readers decode concatenated members as one stream): one
    64 MiB member of zeros is compressed once and repeated, so nothing large is ever
    held or written.
    """
    noise = np.random.default_rng(0).normal(0, 100, (16, 16, 16)).astype(np.float32)
    head = gzip.compress(nib.Nifti1Image(noise, np.eye(4)).to_bytes())
    member = gzip.compress(bytes(64 << 20), compresslevel=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(head)
        for _ in range(round(zeros_gib * 16)):
            fh.write(member)
    return path


def write_huge_grid(path: Path, spacing_mm: float = 200.0) -> Path:
    """A 64^3 scan with `spacing_mm` voxels: at 1.5 mm it would ask for ~8,533^3 voxels."""
    noise = np.random.default_rng(1).normal(0, 100, (64, 64, 64)).astype(np.float32)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(noise, affine), path)
    return path
