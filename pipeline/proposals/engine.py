"""generate_proposals: the per-scan proposal engine (pure numpy; the flows call it).

Pipeline: gradient -> supervoxels at each scale -> RAG hierarchy per scale
(every merge node is a proposal) + intensity-window components -> optional
external sets -> filters (size, inside body, not whole body, near-duplicates,
count cap) -> features.  See ProposalConfig for the knobs and their defaults.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from pipeline.proposals.features import LayerStats, basic_stats, compute_features, layer_stats
from pipeline.proposals.filters import basic_keep, cap_count, suppress_duplicates
from pipeline.proposals.hierarchy import hierarchy_layer
from pipeline.proposals.proposal_set import ProposalSet, merge_sets
from pipeline.proposals.supervoxels import gradient_magnitude, supervoxels
from pipeline.proposals.windows import CT_BANDS, CT_COARSE_BANDS, percentile_bands, window_layer

PROPOSALS_VERSION = "1"
GENERATORS = ("hierarchy", "supervoxels", "windows")


@dataclass(frozen=True)
class ProposalConfig:
    """Knobs of the proposal engine; saved with the proposals and hashed into a fingerprint.

    Attributes:
        generators: any of ``hierarchy`` (merge-tree nodes over supervoxels),
            ``supervoxels`` (the supervoxels themselves) and ``windows``
            (intensity-band connected components).
        scales: supervoxels per scan for each scale (one hierarchy per scale).
        gradient_sigma_mm: Gaussian scale of the gradient that supervoxels follow.
        supervoxel_factor: flood supervoxels on a grid subsampled by this factor
            (2: 8x less flooding and ~2.5x smaller layers on disk, blockier
            boundaries); 0 = auto: 2 when the body has >= 2 M voxels (a body CT at
            1.5 mm), else 1 (small scans keep full-resolution boundaries).
        compactness: 0..1 weight of the distance-to-seed term in supervoxel flooding.
        boundary_weight: weight of the boundary-gradient term in the merge cost.
        size_exponent: merge cost x (harmonic size of the pair)^size_exponent; larger
            values merge small regions first (balanced trees, more distinct nodes).
        percentiles, coarse_percentiles: two band sets (percentiles inside the
            body) for MR/PET windows, one layer each; CT uses two fixed HU band sets
            (fine: air/lung, fat, water, soft tissue, contrast, bone; coarse:
            air/lung, denser than lung, dense).
        window_smooth_mm: Gaussian smoothing before thresholding (fewer, smoother
            components that also compress better).
        split_min_mm3: window components larger than this are also split by a
            distance-transform watershed (0 disables).
        min_volume_mm3: minimum proposal volume per modality.  The published
            500-3,000 voxels at ~1 mm native resolution are 500-3,000 mm^3; we use
            the lower end (small lesions matter): 500 mm^3 = 148 voxels at 1.5 mm.
        min_inside_body: minimum fraction of a proposal inside the body mask.
        max_body_fraction: proposals covering more of the body than this are dropped.
        dedup_iou: a proposal whose IoU with a kept one exceeds this is dropped.
        max_proposals: cap per scan after filtering (quota per source, spread over sizes).
    """

    generators: tuple[str, ...] = ("hierarchy", "supervoxels", "windows")
    scales: tuple[int, ...] = (3000,)
    compactness: float = 0.3
    supervoxel_factor: int = 0
    gradient_sigma_mm: float = 1.5
    boundary_weight: float = 1.0
    size_exponent: float = 1.0
    percentiles: tuple[float, ...] = (0, 10, 25, 40, 55, 70, 85, 95, 100)
    coarse_percentiles: tuple[float, ...] = (0, 35, 65, 100)
    window_smooth_mm: float = 1.0
    split_min_mm3: float = 50_000.0
    split_distance_mm: float = 15.0
    min_volume_mm3: tuple[tuple[str, float], ...] = (("ct", 500.0), ("mr", 500.0), ("pet", 800.0))
    min_inside_body: float = 0.9
    max_body_fraction: float = 0.9
    dedup_iou: float = 0.95
    max_proposals: int = 5000
    version: str = field(default=PROPOSALS_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "generators", tuple(self.generators))
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        object.__setattr__(
            self, "coarse_percentiles", tuple(float(p) for p in self.coarse_percentiles)
        )
        mv = self.min_volume_mm3
        mv = mv.items() if isinstance(mv, dict) else mv
        object.__setattr__(self, "min_volume_mm3", tuple((str(k), float(v)) for k, v in mv))
        bad = set(self.generators) - set(GENERATORS)
        if bad or not self.generators:
            raise ValueError(f"unknown proposal generators {sorted(bad)}; use {GENERATORS}")
        if any(s < 2 for s in self.scales):
            raise ValueError(f"scales must be >= 2 supervoxels, got {self.scales}")
        if not 0 < self.dedup_iou <= 1 or self.max_proposals < 1:
            raise ValueError("need 0 < dedup_iou <= 1 and max_proposals >= 1")

    def min_volume(self, modality: str) -> float:
        table = dict(self.min_volume_mm3)
        return table.get(modality, table.get("mr", 500.0))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["min_volume_mm3"] = dict(self.min_volume_mm3)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ProposalConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown proposal options {sorted(unknown)}")
        return cls(**data)

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _candidates(
    image: np.ndarray,
    body: np.ndarray,
    spacing,
    modality: str,
    config: ProposalConfig,
    min_vox: int,
) -> tuple[list[ProposalSet], dict[str, LayerStats]]:
    sets: list[ProposalSet] = []
    stats: dict[str, LayerStats] = {}
    grad = None
    if {"hierarchy", "supervoxels"} & set(config.generators):
        grad = gradient_magnitude(image, spacing, config.gradient_sigma_mm)
    for n in config.scales if grad is not None else ():
        factor = config.supervoxel_factor or (2 if body.sum() >= 2_000_000 else 1)
        sv, k = supervoxels(image, body, spacing, n, config.compactness, grad, factor)
        if k == 0:
            continue
        name = f"sv{n}"
        info = {"kind": "supervoxels", "n_segments": n, "count": k}
        if "hierarchy" in config.generators and k > 1:
            lay, lo, hi, height, st = hierarchy_layer(
                sv, k, image, grad, spacing, config.boundary_weight, config.size_exponent
            )
            with_leaves = "supervoxels" in config.generators
            starts = np.concatenate([np.arange(1, k + 1), lo]) if with_leaves else lo
            stops = np.concatenate([np.arange(2, k + 2), hi]) if with_leaves else hi
            level = np.concatenate([np.zeros(k), height]) if with_leaves else height
            ps = ProposalSet.from_intervals(
                body.shape, name, lay, starts, stops, "hierarchy", np.minimum(level, 32000), info
            )
            if with_leaves:  # the supervoxels themselves: same layer, zero extra storage
                ps.table["source"] = np.where(np.arange(ps.count) < k, "supervoxels", "hierarchy")
            st.body = np.bincount(lay.reshape(-1), weights=body.reshape(-1), minlength=k + 1)
        else:
            lab = np.arange(1, k + 1)
            ps = ProposalSet.from_intervals(
                body.shape, name, sv, lab, lab + 1, "supervoxels", 0, info
            )
            st = layer_stats(sv, image, body, spacing)
        sets.append(ps)
        stats[name] = st
    if "windows" in config.generators:
        if modality == "ct":
            band_sets = [CT_BANDS, CT_COARSE_BANDS]
        else:
            band_sets = [
                percentile_bands(image, body, config.percentiles),
                percentile_bands(image, body, config.coarse_percentiles),
            ]
        vox_mm3 = float(np.prod(spacing))
        split = int(config.split_min_mm3 / vox_mm3) if config.split_min_mm3 > 0 else None
        for b, bands in enumerate(band_sets):
            lay, iv = window_layer(
                image,
                body,
                spacing,
                bands,
                min_vox,
                smooth_mm=config.window_smooth_mm,
                split_min_voxels=split,
                split_distance_mm=config.split_distance_mm,
            )
            if not iv:
                continue
            arr = np.asarray(iv)
            name = "windows" if b == 0 else f"windows{b + 1}"
            info = {"kind": "windows", "bands": [list(x) for x in bands]}
            ps = ProposalSet.from_intervals(
                body.shape, name, lay, arr[:, 0], arr[:, 1], "windows", arr[:, 2], info
            )
            sets.append(ps)
            stats[name] = layer_stats(lay, image, body, spacing)
    return sets, stats


def generate_proposals(
    image: np.ndarray,
    body: np.ndarray,
    spacing: Sequence[float],
    modality: str,
    config: ProposalConfig | None = None,
    extra: Sequence[ProposalSet] = (),
    timings: dict | None = None,
) -> ProposalSet:
    """Class-agnostic proposals for one scan, filtered, with features.

    ``image`` must be in raw units for CT (HU; the windows are in HU), any units
    otherwise; ``body`` a boolean mask of the same shape.  ``extra`` proposal
    sets (e.g. imported expert masks) are mixed in before filtering and win
    duplicate ties.  An empty body gives an empty set, not an error.
    """
    config = config or ProposalConfig()
    image = np.asarray(image, dtype=np.float32)
    body = np.asarray(body, dtype=bool)
    spacing = tuple(float(s) for s in spacing)
    if image.ndim != 3 or image.shape != body.shape:
        raise ValueError(f"image {image.shape} and body {body.shape} must be the same 3-D shape")
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or inf")
    t = {"start": time.perf_counter()}
    if not body.any():
        return ProposalSet.empty(image.shape)
    min_vox = max(1, int(np.ceil(config.min_volume(modality) / float(np.prod(spacing)))))
    sets, stats = _candidates(image, body, spacing, modality, config, min_vox)
    t["generate"] = time.perf_counter()
    for ex in extra:
        for name in ex.layer_names:
            stats[f"extra:{id(ex)}:{name}"] = layer_stats(ex.layers[name], image, body, spacing)
    sets = [*extra, *sets]
    if not sets:
        return ProposalSet.empty(image.shape)
    allps = merge_sets(sets)
    # merge_sets may rename clashing layers; map stats to the merged names
    merged_stats: dict[str, LayerStats] = {}
    pool = [stats[f"extra:{id(ex)}:{n}"] for ex in extra for n in ex.layer_names]
    pool += [stats[n] for s in sets[len(extra) :] for n in s.layer_names]
    for name, st in zip(allps.layer_names, pool, strict=True):
        merged_stats[name] = st
    base = basic_stats(allps, merged_stats)
    keep = basic_keep(
        base["voxels"],
        base["body_voxels"],
        int(body.sum()),
        min_vox,
        config.min_inside_body,
        config.max_body_fraction,
    )
    ids = np.flatnonzero(keep)
    n_extra = sum(s.count for s in extra)
    priority = np.arange(allps.count) >= n_extra  # extra (imported) masks first
    ids = suppress_duplicates(
        allps, base["voxels"], base["bbox"], ids, config.dedup_iou, priority.astype(int)
    )
    ids = cap_count(ids, allps.table["source"], base["voxels"], config.max_proposals)
    t["filter"] = time.perf_counter()
    out = allps.subset(ids).prune_layers()
    compute_features(out, image, body, spacing)
    t["features"] = time.perf_counter()
    if timings is not None:
        keys = list(t)
        timings.update({k: t[k] - t[p] for p, k in zip(keys[:-1], keys[1:], strict=True)})
        timings["candidates"] = allps.count
    return out
