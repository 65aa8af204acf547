"""Sliding-window inference over a whole scan, memory bounded by the window batch.

Windows are the preset's crop (what the network was trained on), overlapping by
half, blended with Gaussian weights (MONAI's ``sliding_window_inference``, the
standard in this field). Probabilities (sigmoid) are blended, not logits, so a
window that is unsure never outvotes a confident one by magnitude. The scan is
padded with its minimum (as the pair sampler pads crops), never with zero, which
is mid-grey in a normalised image.

The in-context decoder attends to all tasks of a pass at once, so a task's output
depends a little on which tasks share its pass. Tasks are therefore split into
fixed groups of at most ``max_group`` (the K the network was trained with), in
order: the result never depends on the memory budget, which only shrinks groups
when K probability maps of the whole scan would not fit ``max_output_bytes``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from monai.inferers import sliding_window_inference

Predictor = Callable[[torch.Tensor, list[int]], torch.Tensor]


def task_groups(
    n_tasks: int, n_voxels: int, max_group: int, max_output_bytes: int = 1 << 30
) -> list[list[int]]:
    """Consecutive task indices in groups of <= ``max_group`` whose maps fit the budget."""
    per = max(1, min(max_group, int(max_output_bytes // max(1, 4 * n_voxels))))
    return [list(range(i, min(i + per, n_tasks))) for i in range(0, n_tasks, per)]


def window_count(shape: tuple[int, ...], window: int, overlap: float = 0.5) -> int:
    """Windows MONAI places over a volume of ``shape`` (per sliding pass)."""
    return math.prod(
        max(1, math.ceil((n - window) / (window * (1 - overlap))) + 1) if n > window else 1
        for n in shape
    )


def iter_sliding_probabilities(
    predict: Predictor,
    image: np.ndarray,
    groups: list[list[int]],
    window: int,
    overlap: float = 0.5,
    window_batch: int = 2,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield ``(task ids, probabilities (len(ids), *image.shape))`` one group at a time.

    A caller that scores each group before asking for the next holds one group's maps,
    however many tasks there are.
    """
    device = torch.device(device)
    vol = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    fill = float(vol.min()) if vol.numel() else 0.0
    for ids in groups:

        def window_fn(x: torch.Tensor, ids: list[int] = ids) -> torch.Tensor:
            return torch.sigmoid(predict(x.to(device), ids).float())

        with torch.no_grad():
            probs = sliding_window_inference(
                vol,
                roi_size=(window,) * 3,
                sw_batch_size=window_batch,
                predictor=window_fn,
                overlap=overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=fill,
                sw_device=device,
                device="cpu",
                progress=False,
            )
        yield ids, probs[0].numpy()


def sliding_probabilities(
    predict: Predictor,
    image: np.ndarray,
    groups: list[list[int]],
    window: int,
    overlap: float = 0.5,
    window_batch: int = 2,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, dict[str, float]]:
    """Per-task probabilities (K, *image.shape) float32 and timing of the passes.

    ``predict(windows (B,1,w,w,w), task_ids) -> logits (B, len(task_ids), w, w, w)``;
    one sliding pass per group of ``groups`` (consecutive task ids from 0).
    """
    n_tasks = sum(len(g) for g in groups)
    out = np.empty((n_tasks, *image.shape), dtype=np.float32)
    t0 = time.perf_counter()
    for ids, probs in iter_sliding_probabilities(
        predict, image, groups, window, overlap, window_batch, device
    ):
        out[ids[0] : ids[-1] + 1] = probs
    return out, {
        "seconds": time.perf_counter() - t0,
        "passes": len(groups),
        "windows": window_count(image.shape, window, overlap) * len(groups),
    }
