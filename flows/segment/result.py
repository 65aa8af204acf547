"""What segmenting one query gives back, and a look at it (`SegmentResult.show`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class SegmentResult:
    """One query: ``status`` ok, skipped (finished by an earlier run) or failed (``reason``)."""

    scan_id: str
    source: str
    status: str
    reason: str | None = None
    seconds: float = 0.0
    seg_path: str | None = None
    prob_path: str | None = None
    json_path: str | None = None
    labels: dict[int, str] = field(default_factory=dict)
    voxels: dict[int, int] = field(default_factory=dict)
    volume_ml: dict[int, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentResult:
        d = dict(d)
        for key in ("labels", "voxels", "volume_ml"):
            d[key] = {int(k): v for k, v in (d.get(key) or {}).items()}
        return cls(**d)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, label map, affine)`` on the query's own grid, as stored."""
        import nibabel as nib

        from maskbank.pipeline.reader import read_scan

        if not self.ok or self.seg_path is None:
            raise ValueError(f"{self.scan_id} has no segmentation ({self.reason})")
        raw = read_scan(self.source, check_values=False)
        seg = nib.load(self.seg_path)
        if not np.allclose(seg.affine, raw.affine, atol=1e-4):
            raise ValueError(f"{self.seg_path} is not on the grid of {self.source}")
        return np.asarray(raw.data, np.float32), np.asarray(seg.dataobj), raw.affine

    def show(self, viewer: str = "auto", path: str | None = None) -> Any:
        """NiiVue in a notebook when ``ipyniivue`` is installed, else three orthogonal slices.

        ``path`` saves the static figure (PNG) there; ``viewer="static"`` always draws it.
        """
        image, seg, affine = self.arrays()
        if viewer != "static" and path is None and _niivue_available():
            return _niivue(image, seg, affine, self.scan_id)
        return overlay_figure(image, seg, affine, self.labels, self.scan_id, path)


def _niivue_available() -> bool:
    try:
        import ipyniivue  # noqa: F401
    except ImportError:
        return False
    return True


def _niivue(image: np.ndarray, seg: np.ndarray, affine: np.ndarray, name: str) -> Any:
    import nibabel as nib
    from ipyniivue import NiiVue, Volume

    vols = [
        Volume(data=nib.Nifti1Image(image, affine).to_bytes(), name=f"{name}.nii", colormap="gray"),
        Volume(
            data=nib.Nifti1Image(seg.astype(np.uint16), affine).to_bytes(),
            name=f"{name}_seg.nii",
            colormap="warm",
            opacity=0.5,
            cal_min=0.5,
            cal_max=float(max(int(seg.max()), 1)),
        ),
    ]
    viewer = NiiVue()
    viewer.load_volumes(vols)
    return viewer


def overlay_figure(
    image: np.ndarray,
    seg: np.ndarray,
    affine: np.ndarray,
    names: dict[int, str],
    title: str,
    path: str | None = None,
):
    """Sagittal, coronal and axial slices through the segmentation's centre, the labels
    filled in colour, drawn in RAS as the bank's figures are (the patient's right on the
    image's right); saved to ``path`` when given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from maskbank.pipeline.orient import to_ras

    img, ras = to_ras(image, affine, copy=False)
    lab = to_ras(seg, affine, copy=False)[0]
    spacing = np.linalg.norm(ras[:3, :3], axis=0)
    fg = np.nonzero(lab)
    centre = [int(np.median(a)) if len(a) else n // 2 for a, n in zip(fg, lab.shape, strict=True)]
    views = (
        ("sagittal", img[centre[0]], lab[centre[0]], spacing[1], spacing[2]),
        ("coronal", img[:, centre[1]], lab[:, centre[1]], spacing[0], spacing[2]),
        ("axial", img[:, :, centre[2]], lab[:, :, centre[2]], spacing[0], spacing[1]),
    )
    lo, hi = np.percentile(np.concatenate([v[1].ravel() for v in views]), [1, 99])
    colours = plt.get_cmap("tab10")(np.arange(10))
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for axis, (name, im, lb, px, py) in zip(axes, views, strict=True):
        aspect = py / px
        axis.imshow(im.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        values = np.unique(lb)
        layer = np.ma.masked_equal(lb.T, 0)
        axis.imshow(
            (layer - 1) % 10, cmap=cmap, vmin=0, vmax=9, alpha=0.45, origin="lower",
            aspect=aspect, interpolation="nearest",
        )  # fmt: skip
        for v in values[values > 0]:
            axis.contour(
                (lb == v).T, levels=[0.5], colors=[colours[(int(v) - 1) % 10]], linewidths=0.8
            )
        axis.set_title(f"{name} (slice {centre[['sagittal', 'coronal', 'axial'].index(name)]})")
        axis.set_axis_off()
    handles = [
        Patch(color=colours[(int(v) - 1) % 10], label=f"{v}: {n}") for v, n in sorted(names.items())
    ]
    rows = -(-len(handles) // 6)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.02 + 0.06 * rows, 1, 0.95))
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig
