"""Synthetic CT-, MR- and PET-like volumes with known structures.

Tests need ground truth (organs, a vessel, bone, lesions) and the demo needs
something to run on when no scans are at hand. Geometry is defined in
fractions of the field of view so any shape/spacing gives the same anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

# name -> (centre as FOV fraction in [-0.5, 0.5], semi-axes as FOV fraction)
_ELLIPSOIDS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "lung_right": ((0.17, 0.02, 0.24), (0.13, 0.17, 0.22)),
    "lung_left": ((-0.17, 0.02, 0.24), (0.12, 0.17, 0.22)),
    "liver": ((0.15, 0.05, -0.12), (0.17, 0.16, 0.13)),
    "spleen": ((-0.2, -0.08, -0.08), (0.07, 0.08, 0.09)),
    "kidney_right": ((0.12, -0.2, -0.3), (0.05, 0.05, 0.1)),
    "kidney_left": ((-0.12, -0.2, -0.28), (0.05, 0.05, 0.1)),
}
_STRUCTURES = [*_ELLIPSOIDS, "spine", "aorta", "lesion"]
NAMES: dict[int, str] = {i + 1: n for i, n in enumerate(_STRUCTURES)}

# Intensity of background body tissue, air and each structure, per modality.
# CT "body" is the fat-muscle mix between organs (about 10 HU on average), so the
# spleen stands out from it as in contrast-enhanced abdominal CT.
_INTENSITY = {
    "ct": {
        "air": -1000.0,
        "body": 10.0,
        "lung_right": -850.0,
        "lung_left": -850.0,
        "liver": 60.0,
        "spleen": 48.0,
        "kidney_right": 150.0,
        "kidney_left": 150.0,
        "spine": 700.0,
        "aorta": 220.0,
        "lesion": -5.0,
    },
    "mr": {
        "air": 0.0,
        "body": 300.0,
        "lung_right": 30.0,
        "lung_left": 30.0,
        "liver": 480.0,
        "spleen": 620.0,
        "kidney_right": 720.0,
        "kidney_left": 720.0,
        "spine": 160.0,
        "aorta": 900.0,
        "lesion": 820.0,
    },
    "pet": {
        "air": 0.0,
        "body": 0.8,
        "lung_right": 0.3,
        "lung_left": 0.3,
        "liver": 2.4,
        "spleen": 2.0,
        "kidney_right": 4.0,
        "kidney_left": 4.0,
        "spine": 1.2,
        "aorta": 1.7,
        "lesion": 9.0,
    },
}
_NOISE = {"ct": 12.0, "mr": 15.0, "pet": 0.15}


@dataclass
class Phantom:
    """A synthetic scan: raw intensities plus the ground truth it was drawn from."""

    image: np.ndarray
    labels: np.ndarray
    body: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    names: dict[int, str] = field(default_factory=lambda: dict(NAMES))

    @property
    def affine(self) -> np.ndarray:
        """RAS affine with the volume centred on the world origin."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = -np.asarray(self.spacing) * (np.asarray(self.image.shape) - 1) / 2
        return aff

    def save_nifti(self, directory: str | Path, name: str | None = None) -> tuple[Path, Path]:
        """Write ``<name>.nii.gz`` and ``<name>_label.nii.gz``; CT is stored as int16 HU like scanners do."""
        import nibabel as nib

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = name or f"phantom_{self.modality}"
        data = np.round(self.image).astype(np.int16) if self.modality == "ct" else self.image
        image_path = directory / f"{name}.nii.gz"
        label_path = directory / f"{name}_label.nii.gz"
        nib.save(nib.Nifti1Image(data, self.affine), image_path)
        nib.save(nib.Nifti1Image(self.labels.astype(np.uint16), self.affine), label_path)
        return image_path, label_path


def _grid(shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Open grid of FOV-fraction coordinates in [-0.5, 0.5] per axis."""
    return [
        (np.arange(n, dtype=np.float32) / max(n - 1, 1) - 0.5).reshape(
            [-1 if a == i else 1 for a in range(3)]
        )
        for i, n in enumerate(shape)
    ]


def make_phantom(
    modality: str = "ct",
    shape: tuple[int, int, int] = (96, 96, 80),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    seed: int = 0,
    n_lesions: int = 2,
) -> Phantom:
    """Draw a torso-like phantom: body, lungs, liver, spleen, kidneys, spine, aorta and lesions."""
    if modality not in _INTENSITY:
        raise ValueError(f"modality must be one of {sorted(_INTENSITY)}, got {modality!r}")
    rng = np.random.default_rng(seed)
    x, y, z = _grid(tuple(int(s) for s in shape))
    values = _INTENSITY[modality]
    labels = np.zeros(shape, dtype=np.uint16)
    index = {n: i for i, n in NAMES.items()}

    body = ((x / 0.44) ** 2 + (y / 0.36) ** 2 <= 1.0) & (np.abs(z) <= 0.5)
    body = np.broadcast_to(body, shape).copy()

    for name, (centre, axes) in _ELLIPSOIDS.items():
        c = np.asarray(centre) + rng.uniform(-0.015, 0.015, 3)
        a = np.asarray(axes) * rng.uniform(0.92, 1.08, 3)
        inside = ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + (
            (z - c[2]) / a[2]
        ) ** 2 <= 1.0
        labels[inside & body] = index[name]
    spine = ((x / 0.05) ** 2 + ((y + 0.28) / 0.05) ** 2 <= 1.0) & (np.abs(z) <= 0.48)
    labels[np.broadcast_to(spine, shape)] = index["spine"]
    aorta = (((x + 0.03) / 0.025) ** 2 + ((y + 0.17) / 0.025) ** 2 <= 1.0) & (np.abs(z) <= 0.46)
    labels[np.broadcast_to(aorta, shape)] = index["aorta"]
    liver_c = np.asarray(_ELLIPSOIDS["liver"][0])
    for _ in range(n_lesions):
        c = liver_c + rng.uniform(-0.06, 0.06, 3)
        r = rng.uniform(0.025, 0.04)
        lesion = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r * r) & (
            labels == index["liver"]
        )
        labels[lesion] = index["lesion"]

    image = np.where(body, values["body"], values["air"]).astype(np.float32)
    lut = np.array([values["body"]] + [values[n] for n in _STRUCTURES], dtype=np.float32)
    image = np.where(labels > 0, lut[labels], image)
    if modality == "pet":
        image = ndimage.gaussian_filter(image, sigma=1.5)  # scanner point-spread function
    if modality == "mr":  # smooth multiplicative bias field
        image *= (1.0 + 0.15 * x + 0.1 * y).astype(np.float32)
    image += rng.normal(0.0, _NOISE[modality], size=shape).astype(np.float32)
    if modality == "pet":
        image = np.clip(image, 0.0, None)
    return Phantom(
        image=image.astype(np.float32),
        labels=labels,
        body=body,
        spacing=tuple(float(s) for s in spacing),
        modality=modality,
    )
