"""Supervoxels: compact watershed on the gradient from a regular grid of seeds.

skimage's SLIC on a 3D volume of ~12 M voxels takes more than a minute on one
core; a compact watershed seeded on a grid spaced for the wanted number of
segments gives SLIC-like, boundary-following supervoxels in a few seconds.
Segments are restricted to the body mask (label 0 outside).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed


def gradient_magnitude(image: np.ndarray, spacing, sigma_mm: float = 1.5) -> np.ndarray:
    """Gaussian gradient magnitude in intensity units per mm (float32)."""
    sigma = [sigma_mm / s for s in spacing]
    img = image.astype(np.float32, copy=False)
    out = np.zeros(img.shape, np.float32)
    for ax in range(3):
        order = [0, 0, 0]
        order[ax] = 1
        g = ndimage.gaussian_filter(img, sigma, order=order) / np.float32(spacing[ax])
        out += g * g
    return np.sqrt(out, out=out)


def _steps(body: np.ndarray, spacing, n_segments: int) -> list[float]:
    """Seed spacing in voxels per axis (fractional, so the count tracks n_segments)."""
    body_mm3 = float(body.sum()) * float(np.prod(spacing))
    step_mm = (body_mm3 / max(n_segments, 1)) ** (1 / 3)
    return [max(1.0, step_mm / s) for s in spacing]


def _seed_coords(n: int, step: float, offset: float = 0.5) -> np.ndarray:
    return np.unique(np.minimum(np.arange(step * offset, n, step).astype(np.int64), n - 1))


def grid_seeds(
    body: np.ndarray, spacing, n_segments: int, offset: Sequence[float] = (0.5, 0.5, 0.5)
) -> np.ndarray:
    """Int32 marker volume: one seed per cell of a grid sized for ~n_segments in the body.

    ``offset`` places the seeds within their cells (fractions of a step per axis):
    partitions of one size from different offsets cut the body at different places.
    """
    steps = _steps(body, spacing, n_segments)
    markers = np.zeros(body.shape, np.int32)
    coords = [_seed_coords(n, st, o) for n, st, o in zip(body.shape, steps, offset, strict=True)]
    ix = np.ix_(*coords)
    seeds = body[ix]
    sub = markers[ix]
    sub[seeds] = np.arange(1, int(seeds.sum()) + 1, dtype=np.int32)
    markers[ix] = sub
    return markers


def seed_distance(shape, steps, offset: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """Normalised distance (0 at a seed, ~1 at a cell corner) to the nearest grid seed."""
    d2 = np.zeros(shape, np.float32)
    for ax, (n, st, o) in enumerate(zip(shape, steps, offset, strict=True)):
        i = np.arange(n, dtype=np.float32) - np.float32(st * o)
        half = st / 2
        dist = np.minimum(np.abs(i - np.round(i / st) * st), half) / max(half, 1)
        d2 += (dist**2).reshape([-1 if k == ax else 1 for k in range(3)])
    return np.sqrt(d2 / 3)


def relabel_raster(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber labels 1..n in order of first appearance in C order (0 stays 0)."""
    flat = labels.reshape(-1)
    values, first = np.unique(flat, return_index=True)
    order = np.argsort(first)
    lut = np.zeros(int(values.max(initial=0)) + 1, np.int32)
    nz = values[order] != 0
    lut[values[order][nz]] = np.arange(1, int(nz.sum()) + 1, dtype=np.int32)
    return lut[labels], int(nz.sum())


def supervoxels(
    image: np.ndarray,
    body: np.ndarray,
    spacing,
    n_segments: int,
    compactness: float = 0.0,
    gradient: np.ndarray | None = None,
    factor: int = 1,
    offset: Sequence[float] = (0.5, 0.5, 0.5),
) -> tuple[np.ndarray, int]:
    """(int32 label map, count): ~n_segments watershed regions inside the body.

    ``factor`` > 1 floods a grid subsampled by that factor and upsamples the
    labels (nearest): factor^3 less work and blockier boundaries, which
    compress several times better on disk.

    The flooding priority is the histogram-equalised gradient (quantised to
    uint8, which makes skimage's watershed ~2x faster) plus ``compactness`` x
    the distance to the nearest seed, a cheap stand-in for SLIC/compact
    watershed (5x slower).
    Body voxels the flood cannot reach from any seed (tiny islands) get their
    own connected-component labels so the map covers the whole body.
    """
    if not body.any():
        return np.zeros(body.shape, np.int32), 0
    if gradient is None:
        gradient = gradient_magnitude(image, spacing)
    if factor > 1 and min(body.shape) >= 2 * factor:
        f = int(factor)
        sub = (slice(f // 2, None, f),) * 3
        coarse, k = supervoxels(
            image[sub],
            body[sub],
            [s * f for s in spacing],
            n_segments,
            compactness,
            gradient[sub],
            1,
            offset,
        )
        # grow the labels a voxel into the coarse grid's background first: body voxels
        # the subsampling missed (its fringe) are then covered at 1/f^3 of the cost
        up = grow_labels(coarse, steps=1)
        for ax in range(3):
            up = np.repeat(up, f, axis=ax)
        pad = [(f // 2, max(0, n - u - f // 2)) for n, u in zip(body.shape, up.shape, strict=True)]
        up = np.pad(up, pad, mode="edge")[: body.shape[0], : body.shape[1], : body.shape[2]]
        labels = np.where(body, up, 0).astype(np.int32)
        return _cover_body(labels, body)
    markers = grid_seeds(body, spacing, n_segments, offset)
    if markers.max() == 0:
        return np.zeros(body.shape, np.int32), 0
    steps = _steps(body, spacing, n_segments)
    # Histogram-equalised gradient: weak organ boundaries (a few HU) keep their
    # rank instead of being quantised away next to lung and bone edges.
    qs = np.percentile(gradient[body], np.linspace(0, 100, 257)[1:-1])
    prio = np.searchsorted(qs, gradient).astype(np.float32) / 255.0 * (1 - compactness)
    prio += compactness * seed_distance(body.shape, steps, offset)
    prio = (prio * 255).astype(np.uint8)
    markers = _seeds_to_minima(markers, prio, body, radius=max(1, int(min(steps) // 4)))
    labels = watershed(prio, markers, mask=body)
    return _cover_body(labels.astype(np.int32, copy=False), body)


def _seeds_to_minima(
    markers: np.ndarray, prio: np.ndarray, body: np.ndarray, radius: int
) -> np.ndarray:
    """Move each seed to the lowest-priority body voxel within ``radius`` (as SLIC does).

    A seed left on a noisy high-gradient voxel is engulfed by its neighbours'
    floods and ends up a few voxels big; at a local minimum it grows normally.
    """
    pos = np.argwhere(markers > 0)
    if len(pos) == 0:
        return markers
    ids = markers[tuple(pos.T)]
    r = np.arange(-radius, radius + 1)
    offs = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    cand = pos[:, None, :] + offs[None]
    cand = np.clip(cand, 0, np.array(markers.shape) - 1)
    idx = tuple(cand.transpose(2, 0, 1))
    cost = prio[idx].astype(np.int32) + np.where(body[idx], 0, 1 << 20)
    best = cand[np.arange(len(pos)), np.argmin(cost, axis=1)]
    out = np.zeros_like(markers)
    out[tuple(best.T)] = ids  # two seeds landing on one voxel: one survives (harmless)
    return out


def grow_labels(labels: np.ndarray, into: np.ndarray | None = None, steps: int = 16) -> np.ndarray:
    """Grow ``labels`` in place into their unlabelled voxels (those of ``into`` only, when
    given), the largest neighbouring label winning, at most ``steps`` voxels: until every
    such voxel is labelled or a step labels none.  Returns ``labels``."""
    before = -1
    for _ in range(steps):
        missing = labels == 0 if into is None else into & (labels == 0)
        n_missing = int(missing.sum())
        if n_missing == 0 or n_missing == before:
            break
        before = n_missing
        grown = ndimage.maximum_filter(labels, size=3)
        labels[missing] = grown[missing]
    return labels


def _cover_body(labels: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, int]:
    """Give unlabelled body voxels a neighbour's label (or their own component's); relabel."""
    grow_labels(labels, body)  # into reachable gaps (a few voxels wide at most)
    missing = body & (labels == 0)
    if missing.any():
        cc, _ = ndimage.label(missing)
        labels[missing] = cc[missing] + labels.max()
    return relabel_raster(labels)
