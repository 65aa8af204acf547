from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from maskbank.train.augment import STRONG
from maskbank.train.augment.mask_bits import (
    MAX_TASKS,
    nearest_bits,
    pack_bits,
    unpack_bits,
    unpack_bits_reference,
)
from maskbank.train.augment.spatial import random_affine, voxel_coords


def test_pack_unpack_roundtrip():
    masks = torch.rand(2, 14, 6, 7, 8) > 0.5
    assert torch.equal(unpack_bits(pack_bits(masks), 14), masks)
    assert torch.equal(unpack_bits_reference(pack_bits(masks), 14), masks)
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(1, MAX_TASKS + 1, 2, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(5, 6, 7), (4, 6, 8)])
def test_unpack_matches_the_shifts_for_high_bits(shape):
    bits = torch.randint(0, 2**23, (2, 1, *shape), dtype=torch.int32)
    assert torch.equal(unpack_bits(bits, 23), unpack_bits_reference(bits, 23))
    narrow = torch.randint(-(2**15), 2**15, (2, 1, *shape), dtype=torch.int32)
    want = unpack_bits_reference(narrow, 16)
    assert torch.equal(unpack_bits(narrow.to(torch.int16), 16), want)
    assert torch.equal(unpack_bits(narrow[..., 1:, :], 16), want[..., 1:, :])  # strided


def test_int16_bit_fields_carry_all_16_bits():
    """n_bits <= 16 gathers int16 fields; bit 15 (the sign bit) survives to the masks."""
    g = torch.Generator().manual_seed(11)
    masks = torch.rand(2, 16, 30, 32, 34, generator=g) > 0.5
    bits = pack_bits(masks)
    mat = random_affine(2, replace(STRONG, p_affine=1.0), g, "cpu")
    co = voxel_coords(mat, (30, 32, 34), 24)
    wide, narrow = nearest_bits(bits, co), nearest_bits(bits, co, n_bits=16)
    assert wide.dtype == torch.int32 and narrow.dtype == torch.int16
    assert torch.equal(unpack_bits(narrow, 16), unpack_bits(wide, 16))
    assert unpack_bits(narrow, 16)[:, 15].any()
    assert (wide == 0).any()  # zoomed or rotated out: zero outside the input
