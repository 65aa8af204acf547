"""Scale-normalised in-context inference: a coarser grid for classes the crop cannot frame.

The network sees a reference crop of its training size (32^3 voxels for ``tiny``) centred
on the class. A large structure (a liver, a lung at 1.5 mm) fills that crop: its mask
then carries no boundary, and every query voxel that looks like the inside matches. With
a reference zoom, such a class is evaluated at a coarser scale ``s``: the reference crop
covers ``s`` times the extent (``round(crop * s)`` voxels, averaged down to the crop), the
query is averaged down by the same factor, the sliding windows run there, and the
probabilities are interpolated back to the query's grid before the threshold.

``s`` comes from the reference's mask alone (never from the query), from a fixed ladder
(``STEPS``, capped at ``max_zoom``) so classes of one scale share their sliding passes.
Two constraints set it (``fit``):

* **frame**: the structure's longest bounding-box extent should span at most
  ``FIT_SHARE`` (half) of the crop, so the reference mask shows the structure with
  context around it: the smallest step ``s >= longest / (FIT_SHARE * crop)``;
* **resolve**: its shortest extent should keep ``MIN_VOXELS`` voxels at that scale (two
  cells of the 4-voxel grid where the ``tiny`` readout matches reference and query), so
  thin or small structures are never averaged away: ``s <= shortest / MIN_VOXELS``.

Where they conflict, resolve wins (the largest step it allows); a structure that already
fits, a small one, or a thin one (an aorta) keeps scale 1. Images and masks are reduced
by area averaging (anti-aliased; masks become occupancies in [0, 1]); probabilities come
back trilinearly.

Coarse to fine (``zoom_refine``): a class seen at ``s > 1`` is segmented again at the
next finer step of the ladder, but only inside its gate, the coarse prediction dilated
by ``GATE_CELLS`` coarse voxels: the coarse scale finds the structure, the finer one
draws its boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .structures import centred_crop

OFF, FIT = "off", "fit"
MODES = (OFF, FIT)
STEPS = (1.0, 1.5, 2.0, 3.0, 4.0)  # the scales a class may take (shared passes)
FIT_SHARE = 0.5  # the longest extent spans at most this share of the crop ...
MIN_VOXELS = 8  # ... unless the shortest would fall under this many voxels
GATE_CELLS = 2  # coarse-to-fine: the finer pass is kept this many coarse voxels around


def zoom_option_problem(reference_zoom: str, max_zoom: float) -> str | None:
    """What is wrong with these zoom options, as a CLI user would fix it (None: nothing).
    The evaluation and ``maskbank segment`` take the same options and raise their own
    error types with this text."""
    if reference_zoom not in MODES:
        return f"--reference-zoom must be one of {', '.join(MODES)}, got {reference_zoom!r}"
    if not max_zoom >= 1:
        return f"--max-zoom must be >= 1, got {max_zoom}"
    return None


def steps(max_zoom: float) -> list[float]:
    """The ladder up to ``max_zoom`` (always holding 1)."""
    return [s for s in STEPS if s <= max_zoom] or [1.0]


def reference_scale(mask: np.ndarray, crop: int, mode: str = FIT, max_zoom: float = 4.0) -> float:
    """The scale at which a class with reference ``mask`` is seen (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"reference zoom must be one of {MODES}, got {mode!r}")
    if mode == OFF or not mask.any():
        return 1.0
    extents = [int(a.max() - a.min()) + 1 for a in np.nonzero(mask)]
    frame = max(extents) / (FIT_SHARE * crop)
    resolve = min(extents) / MIN_VOXELS
    allowed = [s for s in steps(max_zoom) if s <= max(1.0, resolve)]
    return next((s for s in allowed if s >= frame), allowed[-1])


def side(crop: int, scale: float) -> int:
    """Voxels of the full-resolution region a crop at ``scale`` covers."""
    return max(crop, int(round(crop * scale)))


def zoomed_shape(shape: tuple[int, ...], scale: float) -> tuple[int, ...]:
    """The grid of a volume of ``shape`` seen at ``scale`` (at least 1 voxel per axis)."""
    return tuple(max(1, int(round(n / scale))) for n in shape)


def reduce(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Area average of a 3-D volume onto ``shape`` (float32)."""
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if tuple(t.shape[-3:]) == tuple(shape):
        return t[0, 0].numpy()
    return F.interpolate(t, size=tuple(shape), mode="area")[0, 0].numpy()


def reference_crop(
    image: np.ndarray,
    mask: np.ndarray,
    centre: tuple[int, ...],
    crop: int,
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The (image, mask) crop of ``crop``^3 voxels around ``centre`` at ``scale``.

    At scale 1 it is the plain centred crop (mask as 0/1); above, the region of
    ``side(crop, scale)`` voxels averaged down to the crop. Outside the scan the image is
    its minimum and the mask 0, as in pretraining.
    """
    fill = float(image.min())
    n = side(crop, scale)
    img = centred_crop(image, centre, n, fill)
    msk = centred_crop(mask, centre, n, False).astype(np.float32)
    if n == crop:
        return img, msk
    return reduce(img, (crop,) * 3), reduce(msk, (crop,) * 3)


def restore(probs: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Probabilities (K, *zoomed) back onto the query grid ``shape``, trilinear."""
    if tuple(probs.shape[1:]) == tuple(shape):
        return probs
    t = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))[None]
    out = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0].clamp_(0.0, 1.0).numpy()


def finer_step(scale: float) -> float:
    """The ladder's step below ``scale`` (1 stays 1)."""
    return max((s for s in STEPS if s < scale), default=1.0)


def gate(probs: np.ndarray, scale: float) -> np.ndarray:
    """The coarse prediction (``probs >= 0.5``) dilated by ``GATE_CELLS`` coarse voxels
    (a cube of ``ceil(GATE_CELLS * scale)`` voxels each way on the query grid)."""
    mask = torch.from_numpy(np.ascontiguousarray(probs >= 0.5, dtype=np.float32))[None, None]
    r = int(math.ceil(GATE_CELLS * scale))
    return F.max_pool3d(mask, 2 * r + 1, stride=1, padding=r)[0, 0].numpy() > 0


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """The smallest box holding every voxel of a non-empty ``mask``, grown by ``margin``
    voxels each way within the volume."""
    idx = np.nonzero(mask)
    return tuple(
        slice(max(0, int(a.min()) - margin), min(n, int(a.max()) + 1 + margin))
        for a, n in zip(idx, mask.shape, strict=True)
    )


# One sliding pass: (the volume seen at ``scale``, task indices, scale) -> (positions in
# those indices, probabilities on that volume's grid), one task group at a time.
Pass = Callable[[np.ndarray, list[int], float], Iterable[tuple[list[int], np.ndarray]]]


def zoomed_probabilities(
    image: np.ndarray, scales: Sequence[float], run: Pass, crop: int, refine: bool = True
) -> Iterator[tuple[list[int], np.ndarray]]:
    """``(task indices, probabilities on the grid of image)`` with each task at its scale.

    Tasks of one scale share their passes (in increasing order of scale); with ``refine``
    a zoomed class is segmented again one step finer inside its coarse gate
    (`refine_inside_gates`). Shared by the evaluation and ``maskbank segment``, which
    differ only in where their task embeddings come from (``run``).
    """
    for scale in sorted(set(scales)):
        ids = [i for i, s in enumerate(scales) if s == scale]
        coarse = passes_at(image, ids, scale, run)
        if scale == 1 or not refine:
            yield from coarse
            continue
        for group, probs in coarse:
            yield from refine_inside_gates(image, group, probs, scale, run, crop)


def passes_at(
    image: np.ndarray,
    ids: list[int],
    scale: float,
    run: Pass,
    box: tuple[slice, ...] | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Tasks ``ids`` over ``image`` averaged down to ``scale``, restored to its grid.

    With ``box`` only that part of the image is segmented; the maps are zero outside.
    """
    full = image.shape
    region = image if box is None else image[box]
    part = region.shape
    seen = region if scale == 1 else reduce(region, zoomed_shape(part, scale))
    for local, probs in run(seen, ids, scale):
        probs = restore(probs, part)
        if box is not None:
            whole = np.zeros((len(local), *full), np.float32)
            whole[(slice(None), *box)] = probs
            probs = whole
        yield [ids[j] for j in local], probs


def refine_inside_gates(
    image: np.ndarray, ids: list[int], coarse: np.ndarray, scale: float, run: Pass, crop: int
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Coarse-to-fine: tasks ``ids`` again one step finer, inside their coarse gates.

    The coarse scale says where the structure is; the next finer step of the ladder
    delineates it there. Its probabilities are kept within each class's gate and zero
    outside; the finer pass covers only the box around the gates, with half a window of
    context. A class predicted empty at the coarse scale stays empty.
    """
    gates = [gate(p, scale) for p in coarse]
    live = [j for j, g in enumerate(gates) if g.any()]
    if len(live) < len(ids):
        dead = [j for j in range(len(ids)) if j not in live]
        yield [ids[j] for j in dead], coarse[dead]
    if not live:
        return
    finer = finer_step(scale)
    # Half a window of context around the gates: no window sees a padded edge near them.
    margin = int(round(crop * finer / 2))
    box = bounding_box(np.logical_or.reduce([gates[j] for j in live]), margin)
    for group, probs in passes_at(image, [ids[j] for j in live], finer, run, box):
        keep = np.stack([gates[ids.index(i)] for i in group])
        yield group, probs * keep
