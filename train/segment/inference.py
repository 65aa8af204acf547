"""Sliding-window probabilities of a task set over a prepared (normalised, network-grid) volume.

The windows, blending and padding are the evaluation's (``train.evaluation.sliding``);
classes run in the fixed groups the network was pretrained with (at most K per pass,
each with the global task), or all together for a fine-tuned network, which was trained
so. One group's probability maps exist at a time: memory follows the window batch and
the group, not the number of classes.

Each class runs at the scale its task set gives it (a reference zoom), coarse to fine
with ``zoom_refine``: the evaluation's own sequence of passes
(``train.evaluation.zoom.zoomed_probabilities``), so a segmentation is made the way
the in-context evaluation scores it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from maskbank.train.evaluation.sliding import iter_sliding_probabilities, task_groups
from maskbank.train.evaluation.zoom import zoomed_probabilities
from maskbank.train.incontext_net import InContextSegNet, TaskEmbedding

from .tasks import TaskSet


def auto_window_batch(crop: int) -> int:
    """Windows per pass when none is given: small windows batch well on a CPU (a 32^3 window
    costs several times more alone than in a batch of 16), large ones would only add memory."""
    return max(2, min(16, 2 * (96 // max(1, int(crop))) ** 3))


class Segmenter:
    """A network and its task set, loaded once and applied to any number of volumes."""

    def __init__(
        self,
        model: InContextSegNet,
        tasks: TaskSet,
        crop: int,
        max_group: int,
        device: torch.device | str = "cpu",
        window_batch: int | None = None,
        overlap: float = 0.5,
        max_output_bytes: int = 1 << 30,
        zoom_refine: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tasks = tasks.to(self.device)
        self.crop = int(crop)
        self.max_group = max(1, int(max_group))
        self.window_batch = int(window_batch or auto_window_batch(crop))
        self.overlap = float(overlap)
        self.max_output_bytes = int(max_output_bytes)
        self.zoom_refine = bool(zoom_refine)

    @property
    def largest_group(self) -> int:
        """Classes in the largest pass: what one pass's probability maps hold (memory)."""
        return max(len(g) for g in self.groups(1))

    @property
    def refines(self) -> bool:
        """Whether some class is zoomed and refined coarse to fine (more memory per pass)."""
        return self.zoom_refine and any(s != 1 for s in self.tasks.class_scales)

    def groups(self, n_voxels: int, n_tasks: int | None = None) -> list[list[int]]:
        n = self.tasks.n_tasks if n_tasks is None else n_tasks
        if self.tasks.together:
            return [list(range(n))]
        return task_groups(n, n_voxels, self.max_group, self.max_output_bytes)

    def probabilities(self, image: np.ndarray) -> Iterator[tuple[list[int], np.ndarray]]:
        """``(task indices, probabilities (len, *image.shape) float32)`` one group at a time."""
        return zoomed_probabilities(
            image, self.tasks.class_scales, self._pass, self.crop, self.zoom_refine
        )

    def _pass(
        self, image: np.ndarray, ids: list[int], scale: float
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Tasks ``ids`` over ``image`` (the volume seen at ``scale``); positions in ``ids``."""
        classes, global_task = self.tasks.at(scale)
        classes = classes.select(ids)

        def predict(x: torch.Tensor, local: list[int]) -> torch.Tensor:
            parts = [classes.select(local)]
            if global_task is not None:
                parts.append(global_task)
            return self.model.segment(x, TaskEmbedding.cat(parts))[:, : len(local)]

        return iter_sliding_probabilities(
            predict,
            image,
            self.groups(image.size, len(ids)),
            self.crop,
            overlap=self.overlap,
            window_batch=self.window_batch,
            device=self.device,
        )
