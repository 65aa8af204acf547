"""``--largest-component`` keeps each label's largest piece and nothing of another label."""

from __future__ import annotations

import numpy as np

from maskbank.flows.segment.run import _largest_components


def test_each_label_keeps_its_largest_component_only():
    label = np.zeros((20, 20, 20), np.uint8)
    label[1:6, 1:6, 1:6] = 3  # 125 voxels: kept
    label[10:12, 10:12, 10:12] = 3  # 8 voxels: dropped
    label[15:17, 1:3, 1:3] = 4  # label 4's only piece: kept, though smaller than 3's
    out = _largest_components(label.copy(), [3, 4])
    assert int((out == 3).sum()) == 125 and int((out == 4).sum()) == 8
    assert not out[10:12, 10:12, 10:12].any()
