"""Sliding-window probabilities of a task set over a prepared (normalised, network-grid) volume.

The windows, blending and padding are the evaluation's (``train.evaluation.sliding``);
classes run in the fixed groups the network was pretrained with (at most K per pass,
each with the global task), or all together for a fine-tuned network, which was trained
so. One group's probability maps exist at a time: memory follows the window batch and
the group, not the number of classes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from maskbank.train.evaluation.sliding import iter_sliding_probabilities, task_groups
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
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tasks = tasks.to(self.device)
        self.crop = int(crop)
        self.max_group = max(1, int(max_group))
        self.window_batch = int(window_batch or auto_window_batch(crop))
        self.overlap = float(overlap)
        self.max_output_bytes = int(max_output_bytes)

    def groups(self, n_voxels: int) -> list[list[int]]:
        if self.tasks.together:
            return [list(range(self.tasks.n_tasks))]
        return task_groups(self.tasks.n_tasks, n_voxels, self.max_group, self.max_output_bytes)

    def probabilities(self, image: np.ndarray) -> Iterator[tuple[list[int], np.ndarray]]:
        """``(task indices, probabilities (len, *image.shape) float32)`` one group at a time."""
        classes, global_task = self.tasks.classes, self.tasks.global_task

        def predict(x: torch.Tensor, ids: list[int]) -> torch.Tensor:
            parts = [classes.select(ids)]
            if global_task is not None:
                parts.append(global_task)
            return self.model.segment(x, TaskEmbedding.cat(parts))[:, : len(ids)]

        return iter_sliding_probabilities(
            predict,
            image,
            self.groups(image.size),
            self.crop,
            overlap=self.overlap,
            window_batch=self.window_batch,
            device=self.device,
        )
