"""Which K proposals a pair trains on, given its two crops.

A proposal qualifies when it has at least ``data.min_mask_voxels`` voxels in the reference
crop: bounding boxes rule most out before anything is read, then the candidates' layers are
read in the reference crop only and counted exactly. Without preferences K of those are
drawn uniformly; with ``data.absent_frac`` > 0 some are drawn among proposals whose box misses
the query crop, and with ``data.max_ref_fill`` < 1 proposals that fill the reference crop
come last.
"""

from __future__ import annotations

import math

import numpy as np

from maskbank.bank.sampling import ChunkCache
from maskbank.train.crop_masks import ProposalIndex
from maskbank.train.crop_placement import padded_roi
from maskbank.train.run_config import DataConfig


def choose_visible_proposals(
    rng: np.random.Generator,
    cfg: DataConfig,
    view,
    index: ProposalIndex,
    chunks: ChunkCache,
    ref0: np.ndarray,
    q0: np.ndarray,
) -> np.ndarray | None:
    """K proposals (sorted ids) with >= min_mask_voxels voxels in the reference crop starting
    at ``ref0`` of the scan ``view``, or None when fewer than K have that many (preferences:
    ``prefer``)."""
    shape = tuple(view.shape)
    inner, _ = padded_roi(ref0, cfg.crop, shape)
    # Cheap necessary condition from the bounding boxes before any read.
    cand = index.bbox_overlap(inner) >= cfg.min_mask_voxels
    if np.count_nonzero(cand) < cfg.k:
        return None
    # Candidates' layers are read in the reference crop only (for the counts);
    # only the chosen proposals' layers are read in the whole union box.
    counts = index.counts_in_pieces(
        {
            int(j): chunks.pieces(view, index.layer_arrays[j], inner)
            for j in np.unique(index.layer[cand])
        }
    )
    ok = np.flatnonzero(counts >= cfg.min_mask_voxels)
    if len(ok) < cfg.k:
        return None
    if cfg.max_ref_fill >= 1 and cfg.absent_frac <= 0:
        return np.sort(rng.choice(ok, size=cfg.k, replace=False))
    return prefer(rng, cfg, index, ok, counts[ok], inner, q0, shape)


def prefer(
    rng: np.random.Generator,
    cfg: DataConfig,
    index: ProposalIndex,
    ok: np.ndarray,
    counts: np.ndarray,
    inner: tuple[slice, ...],
    q0: np.ndarray,
    shape: tuple[int, ...],
) -> np.ndarray:
    """K of the visible proposals ``ok``: Binomial(K, absent_frac) of them among those whose
    box misses the query crop (as many as there are), the rest among the others first;
    within each, proposals that leave the reference a boundary (cover at most
    ``max_ref_fill`` of the crop, box not holding it) before those that fill it."""
    vol = math.prod(s.stop - s.start for s in inner)
    fills = (counts > cfg.max_ref_fill * cfg.crop**3) | (index.bbox_overlap(inner)[ok] >= vol)
    q_inner, _ = padded_roi(q0, cfg.crop, shape)
    absent = index.bbox_overlap(q_inner)[ok] == 0
    n_abs = int(rng.binomial(cfg.k, cfg.absent_frac)) if cfg.absent_frac > 0 else 0
    perm = rng.permutation(len(ok))
    # Stable sorts of a random order: ties stay random.
    by_fill = perm[np.argsort(fills[perm], kind="stable")]
    picked = [i for i in by_fill if absent[i]][:n_abs]
    rest = np.setdiff1d(by_fill, picked, assume_unique=True)
    rest = by_fill[np.isin(by_fill, rest)]  # back in preference order
    rest = rest[np.argsort(2 * fills[rest] + absent[rest], kind="stable")]
    chosen = np.concatenate([np.asarray(picked, np.int64), rest[: cfg.k - len(picked)]])
    return np.sort(ok[chosen])
