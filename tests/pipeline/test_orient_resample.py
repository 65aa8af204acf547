import numpy as np
import pytest

from pipeline.orient import to_ras
from pipeline.resample import output_shape, resample


def _world(affine, idx):
    return (affine @ np.append(np.asarray(idx, float), 1.0))[:3]


def test_to_ras_keeps_every_voxel_at_its_world_position():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    lps = np.array(
        [[-0.8, 0, 0, 10], [0, 0, -1.2, 5], [0, 2.0, 0, -3], [0, 0, 0, 1]], float
    )  # also permuted
    out, aff = to_ras(data, lps)
    assert out.shape == (5, 7, 6)
    assert np.all(np.diag(aff)[:3] > 0)
    for idx in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        w = _world(lps, idx)
        new_idx = np.round(np.linalg.solve(aff[:3, :3], w - aff[:3, 3])).astype(int)
        assert out[tuple(new_idx)] == data[idx]


@pytest.mark.parametrize("order", ["F", "C"])
def test_resample_is_exact_on_linear_ramps_and_keeps_geometry(order):
    spacing = (0.5, 1.0, 5.0)
    shape = (60, 30, 8)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = (3.0, -2.0, 7.0)
    target = (1.5, 1.5, 1.5)
    # One ramp per axis (world mm), int16 as scans arrive. Up-sampling (linear) reproduces
    # a ramp exactly; the anti-aliasing triangle filter, sampled at the input voxels,
    # centres within a few hundredths of a voxel (PIL's filter has the same property).
    for axis in range(3):
        world = np.arange(shape[axis]) * spacing[axis] + aff[axis, 3]
        ramp = np.expand_dims(world, [a for a in range(3) if a != axis])
        data = np.broadcast_to(ramp * 10, shape).astype(np.int16).copy(order=order)
        out, new_aff = resample(data, aff, target)
        # floor(n * spacing / target) voxels per axis; output centre j at input (j + .5) * step - .5
        assert out.shape == output_shape(shape, spacing, target) == (20, 20, 26)
        np.testing.assert_allclose(np.linalg.norm(new_aff[:3, :3], axis=0), target)
        np.testing.assert_allclose(new_aff[:3, 3], aff[:3, 3] + (np.asarray(target) - spacing) / 2)
        out_world = np.arange(out.shape[axis]) * target[axis] + new_aff[axis, 3]
        line = np.moveaxis(out, axis, 0)[:, 3, 3] / 10
        step = target[axis] / spacing[axis]
        src = (out_world - aff[axis, 3]) / spacing[axis]
        inside = (src >= max(step, 1.0)) & (src <= shape[axis] - 1 - max(step, 1.0))
        assert inside.sum() >= 4
        tol = 1e-3 if step < 1 else 0.04 * spacing[axis]
        np.testing.assert_allclose(line[inside], out_world[inside], atol=tol)


def test_resample_does_not_ring_on_a_sharp_edge():
    data = np.zeros((90, 90, 12), np.float32)
    data[45:, :, :] = 1000.0
    data[:, :, 6:] += 500.0
    out, _ = resample(data, np.diag([0.6, 0.6, 5.0, 1.0]), (1.5, 1.5, 1.5))
    assert out.min() >= -1e-3 and out.max() <= 1500.0 + 1e-3  # no overshoot either side


def test_downsampling_is_anti_aliased():
    """A checkerboard at the input's Nyquist frequency must average out, not alias to a pattern."""
    data = np.indices((120, 120, 4)).sum(axis=0) % 2 * 100.0
    out, _ = resample(data.astype(np.float32), np.diag([0.5, 0.5, 1.0, 1.0]), (1.75, 1.75, 1.0))
    assert abs(out.mean() - 50.0) < 2.0
    assert out[5:-5, 5:-5].std() < 8.0


def test_labels_use_nearest_neighbour_and_keep_dtype():
    lab = np.zeros((40, 40, 10), np.uint16)
    lab[10:30, 10:30, 2:8] = 7
    lab[12:14, 12:14, 4] = 65000
    out, _ = resample(lab, np.diag([0.5, 0.5, 5.0, 1.0]), (1.0, 1.0, 1.0), is_label=True)
    assert out.dtype == np.uint16
    assert set(np.unique(out)) <= {0, 7, 65000}
    assert 0.8 < (out == 7).sum() * 1.0 * 1.0 * 1.0 / ((lab == 7).sum() * 0.25 * 5.0) < 1.2


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5)])
def test_same_spacing_is_a_no_op(spacing):
    data = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)
    out, aff = resample(data, np.diag([*spacing, 1.0]), spacing)
    assert out is data
    np.testing.assert_allclose(aff, np.diag([*spacing, 1.0]))
