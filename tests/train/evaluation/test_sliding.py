"""Sliding-window inference: stitching is exact, groups are fixed, memory bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskbank.train.evaluation.sliding import sliding_probabilities, task_groups


@pytest.mark.parametrize("shape", [(20, 24, 16), (70, 45, 39)])
def test_windows_stitch_back_the_volume(shape):
    """A predictor that reads the answer off each window gives it back over the whole scan."""
    rng = np.random.default_rng(0)
    mask = rng.random(shape) > 0.5
    image = mask.astype(np.float32)

    def predict(x: torch.Tensor, ids: list[int]) -> torch.Tensor:
        return (x * 20 - 10).expand(-1, len(ids), -1, -1, -1)

    probs, info = sliding_probabilities(predict, image, [[0, 1], [2]], window=32)
    assert probs.shape == (3, *shape)
    for k in range(3):
        assert np.array_equal(probs[k] > 0.5, mask)
    assert info["passes"] == 2 and info["windows"] >= 2


def test_padding_uses_the_scan_minimum():
    """Outside a small scan the network sees its minimum, not zero (mid-grey)."""
    image = np.full((10, 10, 10), 3.0, np.float32)
    image[0, 0, 0] = -2.0
    seen = []

    def predict(x: torch.Tensor, ids: list[int]) -> torch.Tensor:
        seen.append(float(x.min()))
        return torch.zeros(x.shape[0], len(ids), *x.shape[2:])

    sliding_probabilities(predict, image, [[0]], window=16)
    assert seen and min(seen) == -2.0


def test_task_groups_fixed_size_and_budget():
    assert task_groups(30, 1000, max_group=13) == [
        list(range(13)),
        list(range(13, 26)),
        list(range(26, 30)),
    ]
    # A budget of 5 maps of 1000 float32 voxels shrinks the groups to 5.
    groups = task_groups(12, 1000, max_group=13, max_output_bytes=5 * 4000)
    assert [len(g) for g in groups] == [5, 5, 2]
    assert task_groups(3, 10**9, max_group=13, max_output_bytes=1) == [[0], [1], [2]]
