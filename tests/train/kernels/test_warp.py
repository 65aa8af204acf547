"""The compiled warp equals the torch routes (3-D grid_sample, nearest gather) on the same points."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from maskbank.train.augment import STRONG
from maskbank.train.augment.mask_bits import nearest_bits
from maskbank.train.augment.spatial import random_affine, voxel_coords, warp_image
from maskbank.train.kernels.warp import warp_volume


def _warp(image, bits, mat, out, bits_dtype=torch.int32):
    o_img = torch.empty(out, out, out)
    o_bits = torch.empty(out, out, out, dtype=bits_dtype)
    warp_volume(image, bits, mat, o_img, o_bits)
    return o_img, o_bits


@pytest.mark.parametrize("size,out", [((37, 42, 45), 33), ((5, 9, 2), 7), ((1, 6, 6), 4)])
@pytest.mark.parametrize("n_bits", [14, 20])
def test_compiled_warp_equals_the_torch_routes(size, out, n_bits):
    """Odd and degenerate shapes, zoom-out (border clamp, zero bits outside) and zoom-in."""
    g = torch.Generator().manual_seed(3)
    img = torch.randn(1, 1, *size, generator=g)
    bits = torch.randint(0, 2 ** (n_bits - 1), (1, 1, *size), dtype=torch.int32, generator=g)
    for i, mat in enumerate(random_affine(4, replace(STRONG, p_affine=1.0), g, "cpu")):
        mat = mat * (1.6 if i == 0 else 1.0)
        dtype = torch.int16 if n_bits <= 16 else torch.int32
        got_img, got_bits = _warp(img[0, 0], bits[0, 0], mat, out, dtype)
        want_img = warp_image(img, mat[None], out)[0, 0]
        want_bits = nearest_bits(bits, voxel_coords(mat[None], size, out), n_bits)[0, 0]
        assert (got_img - want_img).abs().max() < 1e-4
        assert got_bits.dtype == want_bits.dtype
        assert (got_bits != want_bits).float().mean() < 1e-3  # float rounding at .5 ties only


def test_identity_is_the_centre_crop():
    g = torch.Generator().manual_seed(5)
    img = torch.randn(20, 24, 22, generator=g)
    bits = torch.randint(0, 2**13, (20, 24, 22), dtype=torch.int32, generator=g)
    out_img, out_bits = _warp(img, bits, torch.eye(3), 16)
    lo = [(s - 16) // 2 for s in (20, 24, 22)]
    box = (slice(lo[0], lo[0] + 16), slice(lo[1], lo[1] + 16), slice(lo[2], lo[2] + 16))
    assert torch.equal(out_img, img[box]) and torch.equal(out_bits, bits[box])


@pytest.mark.parametrize("out_dtype", [torch.int16, torch.int32])
def test_float16_image_and_int16_bits_read_directly(out_dtype):
    """float16 image / int16 bits == the warp of their float32 / int32 copies, bit for bit."""
    g = torch.Generator().manual_seed(4)
    img = torch.randn(30, 34, 28, generator=g).half()
    img[0, 0, 0] = 65504.0  # largest half, a subnormal, negative zero
    img[1, 2, 3], img[2, 2, 2] = 3e-7, -0.0
    bits16 = torch.randint(-(2**15), 2**15, (30, 34, 28), dtype=torch.int32, generator=g).short()
    mat = torch.tensor([[0.9, 0.3, 0.0], [-0.2, 1.1, 0.1], [0.05, 0.0, 1.2]])
    for m in (mat, torch.eye(3)):
        want = _warp(img.float(), bits16.int(), m, 24, out_dtype)
        for image in (img, img.float()):
            got = _warp(image, bits16, m, 24, out_dtype)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    conv = _warp(img, bits16, torch.eye(3), 28, out_dtype)[0]  # every value converted exactly
    assert torch.equal(conv, img.float()[1:29, 3:31, :28])


def test_wrong_arguments_raise():
    img, bits = torch.zeros(8, 8, 8), torch.zeros(8, 8, 8, dtype=torch.int32)
    o_img, o_bits = torch.empty(4, 4, 4), torch.empty(4, 4, 4, dtype=torch.int32)
    eye = torch.eye(3)
    with pytest.raises(TypeError):
        warp_volume(img.double(), bits, eye, o_img, o_bits)
    with pytest.raises(TypeError):
        warp_volume(img, bits.long(), eye, o_img, o_bits)
    with pytest.raises(TypeError):
        warp_volume(img.half(), bits, eye, o_img.half(), o_bits)
    with pytest.raises(ValueError):
        warp_volume(img, bits[:7], eye, o_img, o_bits)
    with pytest.raises(ValueError):
        warp_volume(img.transpose(0, 1), bits, eye, o_img, o_bits)  # not contiguous
    with pytest.raises(ValueError):
        warp_volume(img, bits, eye, o_img, o_bits[:3])
    with pytest.raises(ValueError):
        warp_volume(img[None], bits[None], eye, o_img, o_bits)
    with pytest.raises(ValueError):
        warp_volume(img, bits, torch.eye(2), o_img, o_bits)
