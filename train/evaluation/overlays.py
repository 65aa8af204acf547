"""In-context figures: reference / query / prediction / ground truth, one PNG per case."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .incontext_scoring import Overlay


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


def write_overlays(out: str | Path, overlays: Mapping[tuple[str, str], Overlay]) -> list[str]:
    """Per class and network: reference / query / prediction / ground truth on one slice.

    The slice is the axial slice of the query with most ground-truth foreground; the
    reference panel is the reference crop's slice through its centre (its mask outlined).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for (label, key), o in sorted(overlays.items()):
        panels = [
            (f"reference {o.reference}", o.reference_image, o.reference_mask, "tab:orange"),
            (f"query {o.query} z={o.z}", o.query_image, None, None),
            ("prediction", o.query_image, o.prediction, "tab:red"),
            ("ground truth", o.query_image, o.truth, "tab:green"),
        ]
        fig, axes = plt.subplots(1, 4, figsize=(12, 3.4), dpi=100)
        for ax, (title, img, mask, colour) in zip(axes, panels, strict=True):
            _panel(ax, title, img, mask, colour, matplotlib.colors.ListedColormap)
        fig.suptitle(f"{key} — {label}", fontsize=10)
        fig.tight_layout()
        path = out / f"incontext_{slug(label)}_{slug(key)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(str(path))
    return paths


def _panel(ax, title: str, img: np.ndarray, mask, colour, colormap) -> None:
    ax.imshow(img.T, cmap="gray", origin="lower")
    if mask is not None and mask.any():
        overlay = np.ma.masked_where(~mask.T, mask.T)
        ax.imshow(overlay, cmap=colormap([colour]), alpha=0.45, origin="lower")
        ax.contour(mask.T, levels=[0.5], colors=[colour], linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
