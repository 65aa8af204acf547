"""Modality-aware intensity normalisation, invertible from the stored parameters.

CT: clip to a HU window, then z-score. MR and PET: clip to the 2nd-98th
percentile inside the body, then z-score. Statistics are taken inside the body
mask so the amount of air in the field of view does not change the result.
``raw ≈ normalised * std + mean`` (within the clip range) recovers intensities.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import PrepareConfig


def normalization_params(
    image: np.ndarray, body: np.ndarray, modality: str, config: PrepareConfig
) -> dict:
    """Compute the clip window and z-score statistics for one scan."""
    inside = image[body] if body.any() else image.ravel(order="K")
    if modality == "ct":
        lo, hi = config.ct_clip
    else:
        lo, hi = (float(v) for v in np.percentile(inside, config.percentiles))
        if hi <= lo:  # nearly constant body: fall back to the full range
            lo, hi = float(inside.min()), float(inside.max())
    clipped = np.clip(inside, lo, hi)
    mean = float(clipped.mean(dtype=np.float64))
    std = float(clipped.std(dtype=np.float64))
    if std < 1e-6:
        std = 1.0
    return {
        "modality": modality,
        "clip": [float(lo), float(hi)],
        "mean": mean,
        "std": std,
        "inverse": "raw = clip(normalised * std + mean, clip[0], clip[1])",
    }


def apply_normalization(image: np.ndarray, params: dict) -> np.ndarray:
    lo, hi = params["clip"]
    out = np.clip(image, lo, hi)
    out -= np.float32(params["mean"])
    out /= np.float32(params["std"])
    return out


def invert_normalization(normalised: np.ndarray, params: dict) -> np.ndarray:
    """Map bank intensities back to raw units (HU for CT)."""
    return normalised.astype(np.float32) * np.float32(params["std"]) + np.float32(params["mean"])
