"""Jupyter browsing: HTML tables for banks and scans, orthogonal-slice figures with overlays."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import numpy as np

from .index import set_counts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .bank import Bank
    from .scan import ScanView

MAX_ROWS = 50
_COLUMNS = (
    "scan_id",
    "dataset",
    "modality",
    "shape",
    "spacing",
    "has_label",
    "n_proposals",
    "proposal_sets",
    "nbytes",
)


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def _esc(value: object) -> str:
    """Every value shown goes through here: attributes come from files anyone may have written."""
    return html.escape(str(value), quote=True)


def _sets_text(sets: dict) -> str:
    """Index ``proposal_sets`` ({name: {"n", "bytes"}}) as ``default 40, slic 300``."""
    return ", ".join(f"{name} {int((got or {}).get('n') or 0)}" for name, got in sets.items())


def _cell(key: str, value: object) -> str:
    if key == "proposal_sets" and isinstance(value, dict):
        return _esc(_sets_text(value))
    if key == "nbytes" and isinstance(value, int):
        return _esc(_human(value))
    if key == "spacing" and isinstance(value, list):
        return _esc(" × ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in value))
    if key == "shape" and isinstance(value, list):
        return _esc(" × ".join(str(v) for v in value))
    return _esc(value)


def bank_html(bank: Bank, max_rows: int = MAX_ROWS) -> str:
    """Summary line plus a table of the first `max_rows` scans."""
    s = bank.summary()
    head = "".join(f"<th>{_esc(c)}</th>" for c in _COLUMNS)
    rows = [bank.index_rows[sid] for sid in bank.scan_ids[:max_rows]]  # no copy of 10,000 rows
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{_cell(c, set_counts(r) if c == 'proposal_sets' else r.get(c))}</td>"
            for c in _COLUMNS
        )
        + "</tr>"
        for r in rows
    )
    more = f"<p>… and {len(bank) - max_rows} more</p>" if len(bank) > max_rows else ""
    voxels, n_props = f"{s['voxels']:,}", f"{s['proposals']['total']:,}"
    return (
        f"<div><b>maskbank</b> <code>{_esc(bank.location)}</code>: {_esc(s['scans'])} scans, "
        f"{_esc(voxels)} voxels, {_esc(_human(s['bytes']))} on disk, "
        f"{_esc(n_props)} proposals (format {_esc(bank.format_version)})"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}</div>"
    )


def scan_html(scan: ScanView) -> str:
    """Attributes and arrays of one scan."""
    arrays = scan.info.get("arrays", {})
    arr_rows = "".join(
        f"<tr><td>{_esc(n)}</td><td>{_cell('shape', r.get('shape'))}</td>"
        f"<td>{_esc(r.get('dtype'))}</td><td>{_cell('shape', r.get('chunks'))}</td></tr>"
        for n, r in sorted(arrays.items())
    )
    sets = {
        name: {"n": (scan.proposal_set_attrs(name) or {}).get("maskbank", {}).get("n_proposals")}
        for name in scan.proposal_sets
    }  # every set, not only 'default': each is browsed by its name
    prop_line = f"<p>proposals: {_esc(_sets_text(sets))}</p>" if sets else ""
    attr_rows = "".join(
        f"<tr><td>{_esc(k)}</td><td>{_esc(str(v)[:200])}</td></tr>"
        for k, v in sorted(scan.attrs.items())
        if k != "maskbank"
    )
    return (
        f"<div><b>scan</b> <code>{_esc(scan.scan_id)}</code> "
        f"{_cell('shape', list(scan.shape))} @ {_cell('spacing', list(scan.spacing))} mm"
        f"<table><tr><th>array</th><th>shape</th><th>dtype</th><th>chunks</th></tr>{arr_rows}"
        f"</table>{prop_line}<table>{attr_rows}</table></div>"
    )


def _overlay_slice(
    scan: ScanView,
    overlay: str | int | list | tuple | None,
    roi: tuple[slice, ...],
    proposal_set: str = "default",
) -> np.ndarray | None:
    """Integer labels inside roi to draw on top: an array (body/label) or proposal ids (1..K)."""
    labels = scan.overlay(overlay, roi, proposal_set, np.int32)
    return None if labels is None else np.asarray(labels).astype(np.int32, copy=False)


def show_scan(
    bank: Bank,
    scan_id: str,
    overlay: str | int | list | tuple | None = "body",
    ax=None,
    proposal_set: str = "default",
) -> Figure:
    """Three orthogonal mid slices of the image, with an overlay drawn as coloured contours/fill.

    overlay: an array name ("body", "label", ...), a proposal id or a list of them (of set
    ``proposal_set``), or None.
    ax: optional sequence of three matplotlib axes to draw into.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    scan = bank.scan(scan_id)
    if ax is None:
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    else:
        axes = list(ax)
        fig = axes[0].figure
    mid = [n // 2 for n in scan.shape]
    sx, sy, sz = scan.spacing
    views = (  # (title, roi reading only that slice, in-plane spacing along plot x / y)
        ("sagittal", (slice(mid[0], mid[0] + 1), slice(None), slice(None)), sy, sz),
        ("coronal", (slice(None), slice(mid[1], mid[1] + 1), slice(None)), sx, sz),
        ("axial", (slice(None), slice(None), slice(mid[2], mid[2] + 1)), sx, sy),
    )
    slices = [
        np.squeeze(scan.read("image", roi), axis=i).astype(np.float32)
        for i, (_, roi, _, _) in enumerate(views)
    ]
    values = np.concatenate([v.ravel() for v in slices])
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    cmap = ListedColormap(plt.get_cmap("tab20")(np.arange(20)))
    for i, (axis, (title, roi, px, py)) in enumerate(zip(axes, views, strict=True)):
        aspect = py / px
        axis.imshow(slices[i].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        over = _overlay_slice(scan, overlay, roi, proposal_set)
        if over is not None:
            layer = np.ma.masked_equal(np.squeeze(over, axis=i).T, 0)
            axis.imshow(
                layer % 20,
                cmap=cmap,
                vmin=0,
                vmax=19,
                alpha=0.4,
                origin="lower",
                aspect=aspect,
                interpolation="nearest",
            )
        axis.set_title(f"{scan_id} {title}")
        axis.set_axis_off()
    return fig
