"""`maskbank report`: a self-contained HTML quality report of a bank.

Before spending GPU hours on a bank, users want to *see* it: which scans it holds, how
they were normalised, what the proposals look like, and which scans look wrong. The
report reads the bank only through its public API (``bank.tables``, ``ScanView.read``,
``ProposalReader``), draws PNG figures with matplotlib and embeds them in one HTML file
(``index.html``; the PNGs are also written to ``figures/``), so the folder can be
mailed, archived or opened from object storage without a server.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HIST_RANGE = (-5.0, 5.0)  # normalised intensities (z-scores inside the clip window)
HIST_BINS = 200


@dataclass(frozen=True)
class ReportOptions:
    """What the report reads and what it calls suspicious (one place for every threshold)."""

    scan_ids: tuple[str, ...] | None = None  # None = every scan
    montage_scans: int = 48  # scans drawn in the montage (a sample of large banks)
    proposals_per_scan: int = 8  # proposals drawn on each montage panel
    min_proposals: int = 100  # fewer proposals than this is suspicious
    min_body_fraction: float = 0.02  # a body mask below this fraction of the grid is suspicious
    spacing_range_mm: tuple[float, float] = (0.2, 6.0)
    shape_range: tuple[int, int] = (16, 1024)  # per axis, voxels
    outlier_z: float = 4.0  # robust z-score of a scan's body mean/std within its modality
    verify: bool = True  # run the bank's (shallow) integrity check
    quality: bool = True  # proposal quality against labels, where scans have labels
    progress: bool = True
    seed: int = 0


@dataclass
class ScanFacts:
    """What the report learnt of one scan while reading it once."""

    scan_id: str
    modality: str
    body_fraction: float = math.nan
    body_mean: float = math.nan
    body_std: float = math.nan
    proposal_volumes_ml: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reasons: list[str] = field(default_factory=list)
    # The scan as opened here (attributes only, arrays lazy): the montage and the quality
    # table read it again without opening it again, one zarr.json read per scan in all.
    scan: Any = field(default=None, repr=False)


@dataclass
class Figure:
    name: str
    title: str
    png: bytes


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _body_stats(image: np.ndarray, body: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """(body fraction, mean, std, every 4th body voxel) of a normalised image."""
    frac = float(body.mean()) if body.size else 0.0
    inside = image[body].astype(np.float32, copy=False) if frac else np.zeros(0, np.float32)
    if not inside.size:
        return frac, math.nan, math.nan, inside
    return frac, float(inside.mean()), float(inside.std()), inside[::4]


def _geometry_reasons(row: Any, opt: ReportOptions) -> list[str]:
    reasons = []
    lo, hi = opt.spacing_range_mm
    spacing = tuple(row.spacing)
    if spacing and (min(spacing) < lo or max(spacing) > hi):
        reasons.append(f"extreme spacing {list(spacing)} mm (outside {lo}-{hi} mm)")
    smin, smax = opt.shape_range
    shape = tuple(row.shape)
    if shape and (min(shape) < smin or max(shape) > smax):
        reasons.append(f"extreme shape {list(shape)} (an axis outside {smin}-{smax} voxels)")
    return reasons


def _robust_outliers(values: dict[str, float], z: float) -> dict[str, float]:
    """Scans whose value lies more than ``z`` robust standard deviations from the median."""
    finite = {k: v for k, v in values.items() if math.isfinite(v)}
    if len(finite) < 5:  # too few scans of a modality to call one an outlier
        return {}
    arr = np.array(list(finite.values()))
    med = float(np.median(arr))
    mad = float(np.median(np.abs(arr - med))) * 1.4826
    scale = max(mad, 0.05 * max(abs(med), 1e-3), 1e-6)
    return {k: (v - med) / scale for k, v in finite.items() if abs(v - med) / scale > z}


def _montage(scans: Sequence[Any], opt: ReportOptions, columns: int = 4) -> bytes:
    """Mid axial slices of ``scans`` (opened views), each with a sample of its proposals
    as coloured overlays."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from maskbank.bank import NoProposalsError, masks_to_labels
    from maskbank.bank.sampling import ProposalReader

    rows = max(1, math.ceil(len(scans) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    cmap = ListedColormap(plt.get_cmap("tab20")(np.arange(20)))
    rng = np.random.default_rng(opt.seed)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, scan in zip(axes.ravel(), scans, strict=False):
        sid = scan.scan_id
        z = scan.shape[2] // 2
        roi = (slice(None), slice(None), slice(z, z + 1))
        image = np.asarray(scan.read("image", roi))[:, :, 0].astype(np.float32)
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        sx, sy, _ = scan.spacing
        ax.imshow(image.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=sy / sx)
        try:
            reader = ProposalReader(scan)
        except NoProposalsError:
            reader = None
        shown = 0
        if reader is not None and reader.count:
            bbox = np.asarray(reader.table["bbox"]).reshape(-1, 6)
            cuts = (bbox[:, 2] <= z) & (bbox[:, 5] > z)
            # Structures, not the body: proposals above a tenth of the grid would cover the
            # panel (they are still counted in the size plot).
            small = np.asarray(reader.table["voxels"]) < 0.1 * math.prod(scan.shape)
            cuts = np.flatnonzero(cuts & small) if (cuts & small).any() else np.flatnonzero(cuts)
            if cuts.size:
                ids = np.sort(rng.choice(cuts, min(opt.proposals_per_scan, cuts.size), False))
                over = masks_to_labels(reader.masks(ids, roi)[:, :, :, 0], np.int32)
                layer = np.ma.masked_equal(over.T, 0)
                ax.imshow(layer % 20, cmap=cmap, vmin=0, vmax=19, alpha=0.45, origin="lower",
                          aspect=sy / sx, interpolation="nearest")  # fmt: skip
                shown = len(ids)
        ax.set_title(f"{sid}\n{shown} proposals shown", fontsize=8)
    return _png(fig)


def _histograms(hists: dict[str, np.ndarray]) -> bytes:
    import matplotlib.pyplot as plt

    edges = np.linspace(*HIST_RANGE, HIST_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for modality, counts in sorted(hists.items()):
        total = counts.sum()
        if total:
            ax.plot(centres, counts / total, label=f"{modality} ({int(total):,} voxels)")
    ax.set_xlabel("normalised intensity inside the body mask")
    ax.set_ylabel("fraction of voxels")
    ax.legend(fontsize=8)
    ax.set_title("Intensity after normalisation, per modality")
    return _png(fig)


def _proposal_plots(table, facts: dict[str, ScanFacts]) -> bytes:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    counts = table["n_proposals"]
    left.bar(range(len(counts)), counts.to_numpy(), color="tab:blue")
    left.set_xticks(range(len(counts)))
    left.set_xticklabels(list(counts.index), rotation=90, fontsize=6)
    left.set_ylabel("proposals")
    left.set_title("Proposals per scan")
    volumes = [f.proposal_volumes_ml for f in facts.values() if f.proposal_volumes_ml.size]
    if volumes:
        both = np.concatenate(volumes)
        bins = np.logspace(np.log10(max(both.min(), 1e-3)), np.log10(max(both.max(), 1e-2)), 40)
        for f in facts.values():
            if f.proposal_volumes_ml.size:
                right.hist(f.proposal_volumes_ml, bins=bins, histtype="step", alpha=0.7)
        right.set_xscale("log")
    right.set_xlabel("proposal volume (ml)")
    right.set_ylabel("proposals")
    right.set_title("Proposal sizes, one line per scan")
    return _png(fig)


def _quality_rows(bank, facts: dict[str, ScanFacts], scan_ids: list[str]) -> list[dict]:
    from maskbank.flows.proposals_quality import bank_quality

    report = bank_quality(bank, scan_ids, opened={sid: facts[sid].scan for sid in scan_ids})
    return [
        {
            "scan_id": s["scan_id"],
            "ABO": s.get("abo"),
            "recall@0.5": s.get("recall_50"),
            "recall@0.7": s.get("recall_70"),
            "structures": len(s.get("structures") or {}),
            "proposals": s.get("proposals"),
            "B/proposal": s.get("bytes_per_proposal"),
        }
        for s in report.get("scans", [])
    ]


def _table_html(frame) -> str:
    """A DataFrame as an HTML table; pandas escapes every cell."""
    return frame.to_html(
        index=False, escape=True, border=0, classes="t", float_format=lambda v: f"{v:.3g}"
    )


def _progress(items: Iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="scan", dynamic_ncols=True)


def collect(bank, opt: ReportOptions) -> tuple[Any, dict[str, ScanFacts], dict[str, np.ndarray]]:
    """Read every selected scan once: body and intensity statistics, proposal sizes."""
    from maskbank.bank import NoProposalsError

    table = bank.scans
    if opt.scan_ids is not None:
        table = table.loc[list(opt.scan_ids)]
    facts: dict[str, ScanFacts] = {}
    hists: dict[str, np.ndarray] = {}
    for row in _progress(table.itertuples(index=False), len(table), opt.progress, "report"):
        sid = row.scan_id
        scan = bank.scan(sid)
        f = ScanFacts(sid, str(row.modality), scan=scan)
        image = np.asarray(scan.read("image"))
        body = np.asarray(scan.read("body")).astype(bool) if scan.has("body") else None
        if body is None:
            f.reasons.append("no body mask stored")
        else:
            f.body_fraction, f.body_mean, f.body_std, sample = _body_stats(image, body)
            counts, _ = np.histogram(sample, bins=HIST_BINS, range=HIST_RANGE)
            hists[f.modality] = hists.get(f.modality, 0) + counts
            if f.body_fraction == 0:
                f.reasons.append("empty body mask")
            elif f.body_fraction < opt.min_body_fraction:
                f.reasons.append(f"tiny body mask ({100 * f.body_fraction:.2f}% of the grid)")
        if not np.isfinite(image).all():
            f.reasons.append("non-finite voxels in the image")
        f.reasons += _geometry_reasons(row, opt)
        try:
            props = scan.proposal_table()  # bank.proposal_table(sid) would open the scan again
            f.proposal_volumes_ml = props["volume_ml"].to_numpy() if len(props) else np.zeros(0)
        except NoProposalsError:
            pass
        if row.n_proposals == 0:
            f.reasons.append("no proposals (run `maskbank propose`)")
        elif row.n_proposals < opt.min_proposals:
            f.reasons.append(f"too few proposals ({row.n_proposals} < {opt.min_proposals})")
        facts[sid] = f
    by_modality: dict[str, dict[str, ScanFacts]] = {}
    for f in facts.values():
        by_modality.setdefault(f.modality, {})[f.scan_id] = f
    for group in by_modality.values():
        for key in ("body_mean", "body_std"):
            outliers = _robust_outliers(
                {s: getattr(f, key) for s, f in group.items()}, opt.outlier_z
            )
            for sid, z in outliers.items():
                value = getattr(group[sid], key)
                group[sid].reasons.append(
                    f"normalisation outlier: {key.replace('_', ' ')} {value:.2f} "
                    f"(robust z {z:+.1f} among {len(group)} {group[sid].modality} scans)"
                )
    return table, facts, hists


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table.t { border-collapse: collapse; font-size: 0.8em; }
table.t th, table.t td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; }
img { max-width: 100%; }
.bad { color: #a00; }
.wide { overflow-x: auto; }
"""


def render(
    bank, table, facts: dict[str, ScanFacts], figures: list[Figure], extra: dict[str, Any]
) -> str:
    """The whole page (figures embedded as data: URIs)."""
    esc = html.escape
    suspicious = [(sid, f.reasons) for sid, f in facts.items() if f.reasons]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>maskbank report: {esc(str(bank.location))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>maskbank report: <code>{esc(str(bank.location))}</code></h1>",
        f"<p>{len(table)} scans, {int(table['n_proposals'].sum()):,} proposals, "
        f"{int(table['has_label'].sum())} with labels.</p>",
        f"<h2>Suspicious scans ({len(suspicious)})</h2>",
    ]
    if suspicious:
        items = "".join(
            f"<li><code>{esc(sid)}</code>: <span class='bad'>{esc('; '.join(reasons))}</span></li>"
            for sid, reasons in suspicious
        )
        parts.append(f"<ul id='suspicious'>{items}</ul>")
    else:
        parts.append("<p id='suspicious'>None found.</p>")
    if extra.get("verify") is not None:
        problems = extra["verify"]
        parts.append(f"<h2>Integrity check ({len(problems)} problems)</h2>")
        if problems:
            parts.append("<ul>" + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul>")
        else:
            parts.append("<p>The bank verifies (index, attributes, array metadata).</p>")
    for fig in figures:
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(f"<h2>{esc(fig.title)}</h2>")
        parts.append(f'<img alt="{esc(fig.title)}" src="data:image/png;base64,{data}">')
    if extra.get("quality"):
        import pandas as pd

        parts.append("<h2>Proposal quality against the labels (best Dice per structure)</h2>")
        parts.append(_table_html(pd.DataFrame(extra["quality"])))
    from maskbank.flows.report import human_bytes

    shown = table.drop(columns=["source", "written_at"]).copy()
    shown["shape"] = shown["shape"].map(lambda s: "x".join(map(str, s)))
    shown["spacing"] = shown["spacing"].map(lambda s: "x".join(f"{v:g}" for v in s))
    for col in ("bytes", "proposals_bytes"):
        shown[col] = shown[col].map(human_bytes)
    parts.append("<h2>Scans</h2>")
    parts.append(f"<div class='wide'>{_table_html(shown)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(bank, out: str | Path, options: ReportOptions | None = None) -> Path:
    """Write ``out/index.html`` (and ``out/figures/*.png``); returns the page's path."""
    import matplotlib

    matplotlib.use("Agg")
    opt = options or ReportOptions()
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    table, facts, hists = collect(bank, opt)
    extra: dict[str, Any] = {}
    ids = list(table["scan_id"])
    if opt.verify:
        problems = bank.verify(scan_ids=ids, deep=False)
        extra["verify"] = problems
        for sid in ids:
            mine = [p for p in problems if p.startswith(f"{sid}:")]
            if mine:
                facts[sid].reasons.append("failed verification: " + "; ".join(mine))
    figures = []
    if hists:
        figures.append(Figure("intensity", "Intensity histograms", _histograms(hists)))
    if len(table):
        figures.append(
            Figure("proposals", "Proposal counts and sizes", _proposal_plots(table, facts))
        )
        rng = np.random.default_rng(opt.seed)
        sample = ids if len(ids) <= opt.montage_scans else sorted(
            rng.choice(ids, opt.montage_scans, replace=False).tolist()
        )  # fmt: skip
        title = f"Montage: mid axial slice with up to {opt.proposals_per_scan} proposals"
        if len(sample) < len(ids):
            title += f" ({len(sample)} of {len(ids)} scans, chosen at random)"
        figures.append(Figure("montage", title, _montage([facts[s].scan for s in sample], opt)))
    labelled = [s for s in ids if table.loc[s, "has_label"] and table.loc[s, "n_proposals"]]
    if opt.quality and labelled:
        extra["quality"] = _quality_rows(bank, facts, labelled)
    for fig in figures:
        (out / "figures" / f"{fig.name}.png").write_bytes(fig.png)
    page = out / "index.html"
    page.write_text(render(bank, table, facts, figures, extra), encoding="utf-8")
    return page
