"""generate_proposals: the per-scan proposal engine (pure numpy; the flows call it).

Pipeline: sizes from the body and the grid (scaling.scale_plan) -> gradient ->
supervoxels at each scale -> RAG merge trees, compact and appearance-driven
(every node is a proposal) + intensity-window components -> optional external
sets -> filters (size, inside body, not whole body, near-duplicates, count
cap) -> features.  See ProposalConfig for the knobs and their defaults.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

# The options live apart from the engine (a planner reads them without its imports).
from maskbank.pipeline.proposals.config import (  # noqa: F401 (re-exported)
    GENERATORS,
    PROPOSALS_VERSION,
    ProposalConfig,
)
from maskbank.pipeline.proposals.features import (
    LayerStats,
    basic_stats,
    compute_features,
    layer_stats,
)
from maskbank.pipeline.proposals.filters import basic_keep, select_diverse, suppress_duplicates
from maskbank.pipeline.proposals.hierarchy import hierarchy_layer
from maskbank.pipeline.proposals.proposal_set import ProposalSet, merge_sets
from maskbank.pipeline.proposals.scaling import ScalePlan, scale_plan
from maskbank.pipeline.proposals.supervoxels import gradient_magnitude, supervoxels
from maskbank.pipeline.proposals.windows import (
    CT_BANDS,
    CT_COARSE_BANDS,
    percentile_bands,
    window_layer,
)

#: Candidate-only column used to rank proposals (not stored with them).
STABILITY = "stability"
#: Rank of plain-partition segments among tree nodes of their size (tree lifetimes ~0..3).
PARTITION_STABILITY = 1.0


def _tree_sets(
    image: np.ndarray,
    body: np.ndarray,
    spacing,
    config: ProposalConfig,
    plan: ScalePlan,
) -> tuple[list[ProposalSet], dict[str, LayerStats]]:
    """One layer per merge tree: its nodes (and, once per leaf set, the leaves) as proposals."""
    sets: list[ProposalSet] = []
    stats: dict[str, LayerStats] = {}
    grad = gradient_magnitude(image, spacing, config.gradient_sigma_mm)
    leaves: dict[tuple[int, float], tuple[np.ndarray, int]] = {}
    for t, spec in enumerate(plan.trees):
        key = (spec.n_leaves, spec.compactness)
        first = key not in leaves
        if first:
            leaves[key] = supervoxels(
                image, body, spacing, spec.n_leaves, spec.compactness, grad, plan.flood_factor
            )
        sv, k = leaves[key]
        if k == 0:
            continue
        name = f"tree{t + 1}"
        info = {
            "kind": "supervoxels",
            "n_segments": spec.n_leaves,
            "count": k,
            "spatial_weight": spec.spatial_weight,
        }
        with_leaves = "supervoxels" in config.generators and first
        if "hierarchy" in config.generators and k > 1:
            lay, lo, hi, height, st, leaf_life, node_life = hierarchy_layer(
                sv,
                k,
                image,
                grad,
                spacing,
                config.boundary_weight,
                config.size_exponent,
                spec.spatial_weight,
            )
            starts = np.concatenate([np.arange(1, k + 1), lo]) if with_leaves else lo
            stops = np.concatenate([np.arange(2, k + 2), hi]) if with_leaves else hi
            level = np.concatenate([np.zeros(k), height]) if with_leaves else height
            life = np.concatenate([leaf_life, node_life]) if with_leaves else node_life
            ps = ProposalSet.from_intervals(
                body.shape, name, lay, starts, stops, "hierarchy", np.minimum(level, 32000), info
            )
            ps.table[STABILITY] = life.astype(np.float32)
            if with_leaves:  # the supervoxels themselves: same layer, zero extra storage
                ps.table["source"] = np.where(np.arange(ps.count) < k, "supervoxels", "hierarchy")
            st.body = np.bincount(lay.reshape(-1), weights=body.reshape(-1), minlength=k + 1)
        elif first and "supervoxels" in config.generators:
            lab = np.arange(1, k + 1)
            ps = ProposalSet.from_intervals(
                body.shape, name, sv, lab, lab + 1, "supervoxels", 0, info
            )
            st = layer_stats(sv, image, body, spacing)
        else:
            continue
        sets.append(ps)
        stats[name] = st
    if "supervoxels" in config.generators:
        for j, (n, comp, offset, factor) in enumerate(plan.partitions):
            sv, k = supervoxels(image, body, spacing, n, comp, grad, factor, offset)
            if k == 0:
                continue
            if k < 65535:  # 14 partitions of a body CT: half the memory as uint16
                sv = sv.astype(np.uint16)
            name = f"partition{j + 1}"
            lab = np.arange(1, k + 1)
            info = {"kind": "supervoxels", "n_segments": n, "count": k}
            ps = ProposalSet.from_intervals(
                body.shape, name, sv, lab, lab + 1, "supervoxels", 0, info
            )
            ps.table[STABILITY] = np.full(k, PARTITION_STABILITY, np.float32)
            sets.append(ps)
            stats[name] = layer_stats(sv, image, body, spacing)
    return sets, stats


def _candidates(
    image: np.ndarray,
    body: np.ndarray,
    spacing,
    modality: str,
    config: ProposalConfig,
    plan: ScalePlan,
) -> tuple[list[ProposalSet], dict[str, LayerStats]]:
    sets: list[ProposalSet] = []
    stats: dict[str, LayerStats] = {}
    if {"hierarchy", "supervoxels"} & set(config.generators):
        sets, stats = _tree_sets(image, body, spacing, config, plan)
    if "windows" in config.generators:
        if modality == "ct":
            band_sets = [CT_BANDS, CT_COARSE_BANDS]
        else:
            band_sets = [
                percentile_bands(image, body, config.percentiles),
                percentile_bands(image, body, config.coarse_percentiles),
            ]
        for b, bands in enumerate(band_sets):
            lay, iv = window_layer(
                image,
                body,
                spacing,
                bands,
                plan.min_voxels,
                smooth_mm=config.window_smooth_mm,
                split_min_voxels=plan.split_min_voxels,
                split_distance_mm=plan.split_distance_mm,
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
    plan = scale_plan(config, int(body.sum()), spacing, modality)
    min_vox = plan.min_voxels
    sets, stats = _candidates(image, body, spacing, modality, config, plan)
    t["generate"] = time.perf_counter()
    for ex in extra:
        for name in ex.layer_names:
            stats[f"extra:{id(ex)}:{name}"] = layer_stats(ex.layers[name], image, body, spacing)
    sets = [*extra, *sets]
    if not sets:
        return ProposalSet.empty(image.shape)
    n_extra = sum(s.count for s in extra)
    # merge-tree nodes rank by their lifetime; window components (few, intensity-defined)
    # and imported masks come first within their size bin
    stability = np.concatenate(
        [np.asarray(s.table.pop(STABILITY, np.full(s.count, 1e6)), np.float64) for s in sets]
    )
    stability[:n_extra] = np.inf
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
    cap_margin = int(config.max_proposals * 1.2) + 8  # room for the duplicates dropped next
    ids = select_diverse(
        ids, base["voxels"], stability, cap_margin, size_prior=config.cap_size_exponent
    )
    priority = np.arange(allps.count) >= n_extra  # extra (imported) masks first
    ids = suppress_duplicates(
        allps, base["voxels"], base["bbox"], ids, config.dedup_iou, priority.astype(int)
    )
    ids = select_diverse(
        ids, base["voxels"], stability, config.max_proposals, size_prior=config.cap_size_exponent
    )
    t["filter"] = time.perf_counter()
    out = allps.subset(ids).prune_layers()
    compute_features(out, image, body, spacing)
    t["features"] = time.perf_counter()
    if timings is not None:
        keys = list(t)
        timings.update({k: t[k] - t[p] for p, k in zip(keys[:-1], keys[1:], strict=True)})
        timings["candidates"] = allps.count
    return out
