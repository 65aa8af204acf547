"""What to draw: the probabilities and ranges of the augmentations (the published recipe)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class AugmentSpec:
    p_affine: float = 0.8
    scale: tuple[float, float] = (0.7, 1 / 0.7)
    rotation_deg: float = 30.0
    shear: float = 0.2
    p_brightness: float = 0.2
    brightness: tuple[float, float] = (0.75, 1.25)
    p_shift: float = 0.2
    shift: float = 0.1
    p_gamma: float = 0.2
    gamma: tuple[float, float] = (0.7, 1.5)
    p_contrast: float = 0.2
    contrast: tuple[float, float] = (0.75, 1.25)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_noise: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.1)


STRONG = AugmentSpec()
WEAK = replace(STRONG, p_affine=0.5, shear=0.0, p_shift=0.0, p_blur=0.0, p_noise=0.0)
NONE = replace(
    STRONG,
    p_affine=0.0,
    p_brightness=0.0,
    p_shift=0.0,
    p_gamma=0.0,
    p_contrast=0.0,
    p_blur=0.0,
    p_noise=0.0,
)
