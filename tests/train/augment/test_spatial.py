from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from maskbank.train.augment import STRONG, WEAK
from maskbank.train.augment.mask_bits import pack_bits, unpack_bits
from maskbank.train.augment.spatial import (
    center_crop,
    random_affine,
    sampling_grid,
    voxel_coords,
    warp,
    warp_image,
    warp_reference,
)


def test_affine_ranges():
    g = torch.Generator().manual_seed(0)
    mats = random_affine(256, replace(STRONG, p_affine=1.0, shear=0.0), g, "cpu")
    det = torch.linalg.det(mats)
    assert det.min() > 0.7**3 - 1e-4 and det.max() < (1 / 0.7) ** 3 + 1e-4
    assert WEAK.shear == 0 and STRONG.shear > 0


def test_identity_warp_is_a_centre_crop():
    img = torch.randn(2, 1, 40, 44, 48)
    masks = torch.rand(2, 3, 40, 44, 48) > 0.5
    for route in (warp, warp_reference):
        out_img, bits = route(img, pack_bits(masks), torch.eye(3).expand(2, 3, 3), 32)
        assert torch.equal(unpack_bits(bits, 3), center_crop(masks, 32))
        # compiled: the voxels themselves; grid_sample: up to its grid's float rounding
        tol = 0 if route is warp else 1e-4
        assert torch.allclose(out_img, center_crop(img, 32), rtol=0, atol=tol)


def test_warp_equals_the_reference_route():
    """CPU (compiled) vs torch route on random affines, int16 and int32 fields."""
    g = torch.Generator().manual_seed(7)
    img = torch.randn(3, 1, 31, 36, 29, generator=g)
    bits = torch.randint(0, 2**15, (3, 1, 31, 36, 29), dtype=torch.int32, generator=g)
    mat = random_affine(3, replace(STRONG, p_affine=1.0), g, "cpu")
    for n_bits in (15, None):
        got = warp(img, bits, mat, 24, n_bits)
        want = warp_reference(img, bits, mat, 24, n_bits)
        assert (got[0] - want[0]).abs().max() < 1e-4
        assert got[1].dtype == want[1].dtype == (torch.int16 if n_bits else torch.int32)
        assert (got[1] != want[1]).float().mean() < 1e-3
        assert (got[1] == 0).any() and (got[1] != 0).float().mean() > 0.5


def test_masks_match_per_channel_nearest_grid_sample():
    """The bit-packed gather equals nearest grid_sample of every mask through sampling_grid."""
    g = torch.Generator().manual_seed(7)
    img = torch.randn(2, 1, 40, 44, 48, generator=g)
    masks = torch.rand(2, 20, 40, 44, 48, generator=g) > 0.5  # bits up to 2**19
    mat = random_affine(2, replace(STRONG, p_affine=1.0), g, "cpu")
    grid = sampling_grid(mat, (40, 44, 48), 32)
    want = F.grid_sample(masks.float(), grid, mode="nearest", align_corners=True) > 0.5
    for route in (warp, warp_reference):
        out_img, bits = route(img, pack_bits(masks), mat, 32)
        assert out_img.shape == (2, 1, 32, 32, 32) and bits.dtype == torch.int32
        got = unpack_bits(bits, 20)
        assert (got != want).float().mean() < 1e-3  # only float ties at .5 may round apart
        assert got.any() and not got.all()


def test_warp_is_exact_on_linear_volumes():
    """Trilinear weights reproduce affine functions: the warp equals f(p) inside the input."""
    size = (44, 50, 38)
    coef = torch.tensor([0.3, -0.7, 1.1])
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij")
    vol = sum(c * g for c, g in zip(coef, grids, strict=True))[None, None]
    mat = random_affine(6, replace(STRONG, p_affine=1.0), torch.Generator().manual_seed(9), "cpu")
    vol = vol.expand(6, 1, *size).contiguous()
    co = voxel_coords(mat, size, 30)
    inside = ((co >= 0) & (co <= torch.tensor(size).view(1, 3, 1, 1, 1) - 1)).all(1, keepdim=True)
    assert inside.float().mean() > 0.5
    want = (co * coef.view(1, 3, 1, 1, 1)).sum(1, keepdim=True)
    for got in (
        warp(vol, torch.zeros_like(vol, dtype=torch.int32), mat, 30)[0],
        warp_image(vol, mat, 30),
    ):
        assert (got - want).abs()[inside].max() < 1e-3
        # outside the input the border is replicated: values stay within the volume's range
        assert got.min() >= vol.min() - 1e-4 and got.max() <= vol.max() + 1e-4
