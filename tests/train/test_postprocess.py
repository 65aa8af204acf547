import numpy as np
import pytest

from maskbank.train.postprocess import largest_component


def test_keeps_the_largest_piece_only():
    m = np.zeros((10, 10, 10), bool)
    m[1:5, 1:5, 1:5] = True  # 64 voxels
    m[7:9, 7:9, 7:9] = True  # 8 voxels, apart
    out = largest_component(m)
    assert out.dtype == bool and out.sum() == 64 and out[2, 2, 2] and not out[8, 8, 8]
    assert m.sum() == 72  # input untouched


def test_connectivity_and_edge_cases():
    m = np.zeros((4, 4, 4), bool)
    m[0, 0, 0] = m[1, 1, 1] = m[2, 2, 2] = True  # a diagonal: corners only
    m[3, 3, 0] = True
    assert largest_component(m).sum() == 1  # faces: four single voxels
    assert largest_component(m, connectivity=3).sum() == 3  # corners join the diagonal
    assert not largest_component(np.zeros((3, 3), bool)).any()
    with pytest.raises(ValueError):
        largest_component(m, connectivity=4)
