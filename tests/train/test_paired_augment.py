from dataclasses import replace

import pytest
import torch

from train.paired_augment import (
    NONE,
    STRONG,
    WEAK,
    PairAugmenter,
    center_crop,
    pack_bits,
    random_affine,
    unpack_bits,
    warp,
)


def _blob(s=48):
    r = torch.arange(s, dtype=torch.float32) - s / 2
    x, y, z = torch.meshgrid(r, r, r, indexing="ij")
    m1 = ((x - 4) ** 2 / 100 + y**2 / 36 + (z + 3) ** 2 / 64) <= 1
    m2 = (x.abs() < 12) & (y > 5) & (y < 14) & (z.abs() < 9)
    return torch.stack([m1, m2])[None]


def test_pack_unpack_roundtrip():
    masks = torch.rand(2, 14, 6, 7, 8) > 0.5
    assert torch.equal(unpack_bits(pack_bits(masks), 14), masks)


def test_identity_warp_is_a_centre_crop():
    img = torch.randn(2, 1, 40, 44, 48)
    masks = torch.rand(2, 3, 40, 44, 48) > 0.5
    out_img, bits = warp(img, pack_bits(masks), torch.eye(3).expand(2, 3, 3), 32)
    assert torch.equal(out_img, center_crop(img, 32))
    assert torch.equal(unpack_bits(bits, 3), center_crop(masks, 32))


def test_image_and_masks_move_together():
    """Image = mask 0 as intensities: after a strong affine, image > 0.5 matches warped mask 0."""
    masks = _blob()
    img = masks[:, :1].float()
    spec = replace(
        STRONG,
        p_affine=1.0,
        p_brightness=0,
        p_shift=0,
        p_gamma=0,
        p_contrast=0,
        p_blur=0,
        p_noise=0,
    )
    aug = PairAugmenter(32, weak=NONE, strong=spec)
    batch = {
        "ref_image": img,
        "ref_bits": pack_bits(masks),
        "query_image": img,
        "query_bits": pack_bits(masks),
    }
    out = aug(batch, 2, torch.Generator().manual_seed(3))
    warped_img, warped_mask = out["query_image"][0, 0] > 0.5, out["query_masks"][0, 0]
    assert not torch.equal(warped_mask, center_crop(masks, 32)[0, 0])  # it really moved
    agree = (warped_img == warped_mask).float().mean()
    assert agree > 0.97, agree
    assert torch.equal(out["ref_masks"], center_crop(masks, 32))  # NONE = centre crop


def test_affine_ranges_and_determinism():
    g = torch.Generator().manual_seed(0)
    mats = random_affine(256, replace(STRONG, p_affine=1.0, shear=0.0), g, "cpu")
    det = torch.linalg.det(mats)
    assert det.min() > 0.7**3 - 1e-4 and det.max() < (1 / 0.7) ** 3 + 1e-4
    assert WEAK.shear == 0 and STRONG.shear > 0
    masks = _blob()
    batch = {"ref_image": masks[:, :1].float(), "ref_bits": pack_bits(masks)}
    batch.update(query_image=batch["ref_image"], query_bits=batch["ref_bits"])
    a = PairAugmenter(32)(batch, 2, torch.Generator().manual_seed(5))
    b = PairAugmenter(32)(batch, 2, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_intensity_ops_apply_only_when_drawn():
    from train.paired_augment import intensity_augment

    img = torch.randn(3, 1, 24, 24, 24)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(intensity_augment(img, NONE, g), img)
    for op in ("brightness", "shift", "gamma", "contrast", "blur", "noise"):
        off = {f"p_{o}": 0.0 for o in ("brightness", "shift", "gamma", "contrast", "blur", "noise")}
        spec = replace(STRONG, **{**off, f"p_{op}": 1.0})
        out = intensity_augment(img, spec, torch.Generator().manual_seed(1))
        assert out.shape == img.shape and torch.isfinite(out).all()
        assert (out - img).abs().mean() > 1e-3, op


def test_mask_warp_matches_grid_sample_nearest():
    """The bit-packed nearest gather equals per-channel nearest grid_sample through sampling_grid."""
    import torch.nn.functional as F

    from train.paired_augment import sampling_grid

    g = torch.Generator().manual_seed(7)
    img = torch.randn(2, 1, 40, 44, 48, generator=g)
    masks = torch.rand(2, 20, 40, 44, 48, generator=g) > 0.5  # bits up to 2**19
    mat = random_affine(2, replace(STRONG, p_affine=1.0), g, "cpu")
    out_img, bits = warp(img, pack_bits(masks), mat, 32)
    assert out_img.shape == (2, 1, 32, 32, 32) and bits.dtype == torch.int32
    grid = sampling_grid(mat, (40, 44, 48), 32)
    want = F.grid_sample(masks.float(), grid, mode="nearest", align_corners=True) > 0.5
    got = unpack_bits(bits, 20)
    assert (got != want).float().mean() < 1e-3  # only float ties at .5 may round apart
    assert got.any() and not got.all()


def _smooth(shape=(56, 60, 52)):
    axes = [torch.linspace(0, 1, n) for n in shape]
    x, y, z = axes
    return (
        torch.sin(5 * x)[:, None, None] * torch.cos(4 * y)[None, :, None]
        + torch.sin(3 * z)[None, None, :]
        + x[:, None, None] * z[None, None, :]
    ).contiguous()


def _inside(mat, size, out, margin=3.0):
    """Output voxels whose input point is >= margin voxels inside the input (no border effects)."""
    from train.paired_augment import voxel_coords

    co = voxel_coords(mat, size, out)
    hi = torch.tensor(size, dtype=torch.float32).view(1, 3, 1, 1, 1) - 1
    return ((co >= margin) & (co <= hi - margin)).all(1, keepdim=True)


def test_two_pass_cpu_warp_agrees_with_trilinear_grid_sample():
    """CPU two-pass warp vs one 3-D grid_sample (trilinear) on a smooth volume, inside the input."""
    from train.paired_augment import _warp_image_3d, warp_image

    vol = _smooth()[None, None].expand(16, 1, -1, -1, -1).contiguous()
    mat = random_affine(16, replace(STRONG, p_affine=1.0), torch.Generator().manual_seed(4), "cpu")
    got = warp_image(vol, mat, 40)
    want = _warp_image_3d(vol, mat, 40)
    inside = _inside(mat, tuple(vol.shape[-3:]), 40)
    assert inside.float().mean() > 0.5
    err = (got - want).abs()[inside]
    assert err.max() < 0.02 and err.mean() < 2e-3, (err.max(), err.mean())
    # Outside the input the border is replicated: values stay within the volume's range.
    assert got.min() >= vol.min() - 1e-5 and got.max() <= vol.max() + 1e-5


def test_two_pass_warp_is_exact_on_linear_volumes():
    """Bilinear passes reproduce affine functions exactly, so the warp equals f(p) inside."""
    from train.paired_augment import voxel_coords, warp_image

    size = (44, 50, 38)
    coef = torch.tensor([0.3, -0.7, 1.1])
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij")
    vol = sum(c * g for c, g in zip(coef, grids, strict=True))[None, None]
    mat = random_affine(6, replace(STRONG, p_affine=1.0), torch.Generator().manual_seed(9), "cpu")
    vol = vol.expand(6, 1, *size).contiguous()
    got = warp_image(vol, mat, 30)
    want = (voxel_coords(mat, size, 30) * coef.view(1, 3, 1, 1, 1)).sum(1, keepdim=True)
    inside = _inside(mat, size, 30)
    assert inside.float().mean() > 0.5
    assert (got - want).abs()[inside].max() < 1e-3


def test_near_singular_matrices_take_the_exact_3d_path():
    import torch.nn.functional as F

    from train.paired_augment import TWO_PASS_MIN_DET, sampling_grid, warp_image

    mat = torch.tensor([[[1.0, 0.2, 0.1], [0.3, 0.02, 0.0], [0.1, 0.0, 1.0]]])
    assert abs(torch.linalg.det(mat[0, 1:, 1:])) < TWO_PASS_MIN_DET
    img = torch.randn(1, 1, 30, 32, 34, generator=torch.Generator().manual_seed(2))
    grid = sampling_grid(mat, (30, 32, 34), 24)
    want = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)
    assert torch.equal(warp_image(img, mat, 24), want)


def test_blur_matches_conv3d_reference():
    import torch.nn.functional as F

    from train.paired_augment import _gaussian_blur, _gaussian_blur_mm

    img = torch.randn(2, 1, 20, 22, 24)
    sigma = torch.tensor([0.5, 1.0])
    t = torch.arange(-3, 4, dtype=torch.float32)
    for j in range(2):
        k = torch.exp(-(t**2) / (2 * sigma[j] ** 2))
        k = k / k.sum()
        x = img[j : j + 1]
        for dim in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + dim] = 7
            pad = [0] * 6
            pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = 3
            x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
        assert torch.allclose(_gaussian_blur(img, sigma)[j : j + 1], x, atol=1e-5)
        assert torch.allclose(_gaussian_blur_mm(img, sigma)[j : j + 1], x, atol=1e-5)


def test_cpu_intensity_path_matches_the_batched_gpu_formulas():
    """Same draws, same results: the in-place CPU path vs the masked whole-batch path."""
    from train.paired_augment import _intensity_batched, _intensity_cpu, intensity_augment

    img = torch.randn(6, 1, 20, 21, 22, generator=torch.Generator().manual_seed(0)) * 3 + 1
    keep = img.clone()
    for seed in range(4):
        spec = replace(STRONG, p_brightness=0.5, p_shift=0.5, p_gamma=0.5, p_contrast=0.5)
        spec = replace(spec, p_blur=0.5, p_noise=0.0)
        got = _intensity_cpu(img, spec, torch.Generator().manual_seed(seed))
        want = _intensity_batched(img, spec, torch.Generator().manual_seed(seed))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
        assert not torch.equal(got, img)
    assert torch.equal(img, keep)  # the input is never modified ...
    mine = img.clone()  # ... unless handed over with inplace=True
    got = intensity_augment(mine, spec, torch.Generator().manual_seed(0), inplace=True)
    want = intensity_augment(img, spec, torch.Generator().manual_seed(0))
    assert got.data_ptr() == mine.data_ptr() and torch.equal(got, want)
    # noise: drawn per sample on the CPU; applied to exactly the samples that drew it
    spec = replace(NONE, p_noise=0.5)
    got = _intensity_cpu(img, spec, torch.Generator().manual_seed(1))
    drew = torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.5
    changed = (got != img).flatten(1).any(1)
    assert drew.any() and torch.equal(changed, drew)


@pytest.mark.parametrize("shape", [(5, 6, 7), (4, 6, 8)])  # word-wise path: voxels % 8 == 0
def test_unpack_matches_shifts_for_high_bits(shape):
    bits = torch.randint(0, 2**23, (2, 1, *shape), dtype=torch.int32)
    shifts = torch.arange(23, dtype=torch.int32).view(1, -1, 1, 1, 1)
    assert torch.equal(unpack_bits(bits, 23), ((bits >> shifts) & 1).bool())
    narrow = torch.randint(-(2**15), 2**15, (2, 1, *shape), dtype=torch.int32)
    want = ((narrow >> torch.arange(16, dtype=torch.int32).view(1, -1, 1, 1, 1)) & 1).bool()
    assert torch.equal(unpack_bits(narrow.to(torch.int16), 16), want)


def test_int16_bit_fields_carry_all_16_bits():
    """n_bits <= 16 warps int16 fields; bit 15 (the sign bit) survives to the unpacked masks."""
    from train.paired_augment import _nearest_bits

    g = torch.Generator().manual_seed(11)
    masks = torch.rand(2, 16, 30, 32, 34, generator=g) > 0.5
    assert masks[:, 15].any()
    bits = pack_bits(masks)
    mat = random_affine(2, replace(STRONG, p_affine=1.0), g, "cpu")
    wide = _nearest_bits(bits, mat, 24)
    narrow = _nearest_bits(bits, mat, 24, n_bits=16)
    assert wide.dtype == torch.int32 and narrow.dtype == torch.int16
    assert torch.equal(unpack_bits(narrow, 16), unpack_bits(wide, 16))
    assert unpack_bits(narrow, 16)[:, 15].any()


def test_reused_scratch_buffers_do_not_leak_between_calls():
    """Warps of different sizes in turn (shared scratch) give the same results as alone."""
    from train.paired_augment import _nearest_bits, warp_image

    g = torch.Generator().manual_seed(12)
    mat = random_affine(1, replace(STRONG, p_affine=1.0, scale=(1.3, 1.4)), g, "cpu")
    big_img = torch.randn(1, 1, 40, 44, 48, generator=g)
    big_bits = torch.randint(1, 2**13, (1, 1, 40, 44, 48), dtype=torch.int32, generator=g)
    first = warp_image(big_img, mat, 36), _nearest_bits(big_bits, mat, 36, 14)
    small = torch.randint(1, 2**13, (1, 1, 20, 22, 24), dtype=torch.int32, generator=g)
    _nearest_bits(small, mat, 16, 14), warp_image(small.float(), mat, 16)
    again = warp_image(big_img, mat, 36), _nearest_bits(big_bits, mat, 36, 14)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert (first[1] == 0).any()  # zoomed out: the zero border was sampled
