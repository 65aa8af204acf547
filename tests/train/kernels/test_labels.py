"""The compiled label loops equal numpy on strided views of decoded chunks."""

from __future__ import annotations

import numpy as np
import pytest

from maskbank.train.kernels.labels import label_histogram, or_lookup


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_histogram_equals_bincount_on_strided_views(dtype):
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 300, (20, 24, 29)).astype(dtype)
    chunk[3:9, 4:12, 5:25] = 7  # long runs of one label (the interleaved sub-histograms)
    view = chunk[2:19, 3:22, 1:27]
    np.testing.assert_array_equal(
        label_histogram(view, 300), np.bincount(view.ravel(), minlength=300)
    )
    assert label_histogram(view, 200) is None  # labels past the bins: the caller's route


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_or_lookup_equals_numpy_on_strided_views(dtype):
    rng = np.random.default_rng(1)
    view = rng.integers(0, 300, (20, 24, 28)).astype(np.uint16)[2:19, 3:22, 1:27]
    lut = np.zeros(300, dtype)
    lut[rng.integers(0, 300, 40)] = 1 << 3
    lut[7] |= 1 << 14
    field = np.full((30, 30, 40), 1 << 13, dtype)
    want = field.copy()
    box = (slice(5, 22), slice(1, 20), slice(10, 36))
    want[box] |= lut[view]
    or_lookup(view, lut, field[box])
    np.testing.assert_array_equal(field, want)
    with pytest.raises(IndexError):
        or_lookup(view, lut[:100], field[box])


def test_wrong_arguments_raise():
    labels = np.zeros((4, 4, 4), np.uint16)
    dst, lut = np.zeros((4, 4, 4), np.uint16), np.zeros(5, np.uint16)
    with pytest.raises(TypeError):
        label_histogram(labels.astype(np.float32), 5)
    with pytest.raises(ValueError):
        label_histogram(labels[0], 5)
    with pytest.raises(TypeError):
        or_lookup(labels, lut.astype(np.int32), dst)  # table of another dtype than dst
    with pytest.raises(ValueError):
        or_lookup(labels, lut, dst[:3])
    dst.flags.writeable = False
    with pytest.raises(ValueError):
        or_lookup(labels, lut, dst)
