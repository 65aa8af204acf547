import numpy as np
import pytest

from maskbank.pipeline.orient import native_box, ras_affine, ras_axes, to_ras
from maskbank.pipeline.resample import output_shape, resample, resample_planes


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


def test_plane_pass_cropped_before_the_slice_pass_equals_cropping_after():
    """`PlanePass.finish(box)` up-samples only the in-plane box: same voxels as crop-after."""
    rng = np.random.default_rng(4)
    data = rng.normal(size=(40, 36, 9)).astype(np.float32)  # C order: slice axis = 0
    data = np.asfortranarray(data)  # F order: the slice axis (largest stride) is axis 2
    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    planes = resample_planes(data, affine, (1.5, 1.5, 1.5))
    assert planes.slice_axis == 2 and planes.step < 1.0 and planes.n_out == 30
    full = planes.finish()
    np.testing.assert_array_equal(full, resample(data, affine, (1.5, 1.5, 1.5))[0])
    box = (slice(3, 15), slice(2, 11), slice(None))
    np.testing.assert_allclose(planes.finish(box), full[box], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="slice axis"):
        planes.finish((slice(None), slice(None), slice(0, 4)))
    # The intermediate grid keeps the slice spacing and sits where the final grid does in-plane.
    np.testing.assert_allclose(np.linalg.norm(planes.affine[:3, :3], axis=0), [1.5, 1.5, 5.0])


@pytest.mark.parametrize("seed", range(4))
def test_native_box_is_the_ras_box_seen_from_the_file(seed):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(3)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for i, p in enumerate(perm):
        affine[p, i] = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 3.0)
    data = rng.normal(size=(7, 9, 11))
    ras, ras_aff = to_ras(data, affine, copy=False)
    np.testing.assert_allclose(ras_affine(affine, data.shape), ras_aff)
    box = tuple(slice(1, n - 2) for n in ras.shape)
    native = native_box(box, affine, data.shape)
    np.testing.assert_array_equal(to_ras(data[native], affine, copy=False)[0], ras[box])
    for axis, (r, flipped) in enumerate(ras_axes(affine)):
        assert r == perm[axis] and flipped == (affine[r, axis] < 0)
