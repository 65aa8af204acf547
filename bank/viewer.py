"""``scan.show()``: the best viewer available in this environment.

With the optional ``notebook`` extra (``ipyniivue``) the scan opens in NiiVue, a real
medical viewer (orthogonal planes, 3D render, window/level) inside the notebook, with
the chosen proposals or labels as a coloured overlay. Without it, the static
orthogonal-slice matplotlib figure of ``bank.browse.show_scan``.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .scan import ScanView


def niivue_available() -> bool:
    try:
        import ipyniivue  # noqa: F401
    except ImportError:
        return False
    return True


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    buf = io.BytesIO()
    nib.Nifti1Image(data, affine).to_file_map({"image": nib.FileHolder(fileobj=buf)})
    return buf.getvalue()


def overlay_labels(
    scan: ScanView, proposals: Any, proposal_set: str = "default"
) -> np.ndarray | None:
    """Proposal ids of ``proposal_set`` -> labels 1..K (later ids win); an array name -> that
    array; None -> None (uint16, as NiiVue takes it)."""
    labels = scan.overlay(proposals, None, proposal_set, np.uint16)
    return None if labels is None else np.asarray(labels).astype(np.uint16, copy=False)


def niivue_widget(scan: ScanView, proposals: Any = None, proposal_set: str = "default") -> Any:
    """An ``ipyniivue.NiiVue`` widget with the image and, as an overlay, the chosen masks."""
    from ipyniivue import NiiVue, Volume

    affine = np.asarray(scan.affine if scan.affine is not None else np.diag([*scan.spacing, 1]))
    image = np.asarray(scan.read("image")).astype(np.float32)
    volumes = [
        Volume(data=_nifti_bytes(image, affine), name=f"{scan.scan_id}.nii", colormap="gray")
    ]
    labels = overlay_labels(scan, proposals, proposal_set)
    if labels is not None:
        volumes.append(
            Volume(
                data=_nifti_bytes(labels, affine),
                name=f"{scan.scan_id}_masks.nii",
                colormap="warm",
                opacity=0.5,
                cal_min=0.5,
                cal_max=float(max(labels.max(), 1)),
            )
        )
    viewer = NiiVue()
    viewer.load_volumes(volumes)
    return viewer


def show(
    scan: ScanView, proposals: Any = None, viewer: str = "auto", proposal_set: str = "default"
) -> Any:
    """NiiVue when available (``viewer="auto"`` or ``"niivue"``), else a static figure.

    ``proposals``: proposal ids of set ``proposal_set`` (``scan.proposal_sets`` lists the
    scan's sets), or an array name such as ``"label"`` or ``"body"``.
    ``viewer="static"`` always draws the matplotlib figure.
    """
    if viewer not in ("auto", "niivue", "static"):
        raise ValueError(f"viewer must be 'auto', 'niivue' or 'static', got {viewer!r}")
    if viewer == "niivue" and not niivue_available():
        raise ImportError(
            "viewer='niivue' needs ipyniivue: pip install 'maskbank[notebook]' "
            "(or viewer='static' for the matplotlib figure)"
        )
    if viewer != "static" and niivue_available():
        return niivue_widget(scan, proposals, proposal_set)
    from .browse import show_scan

    overlay = proposals if proposals is not None else "body"
    return show_scan(scan.bank, scan.scan_id, overlay=overlay, proposal_set=proposal_set)
