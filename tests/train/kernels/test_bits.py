from __future__ import annotations

import pytest
import torch

from maskbank.train.augment.mask_bits import unpack_bits_reference
from maskbank.train.kernels.bits import unpack_into


@pytest.mark.parametrize("shape", [(5, 6, 7), (1, 1, 1), (16, 16, 17)])
@pytest.mark.parametrize("dtype,k", [(torch.int16, 16), (torch.int32, 23), (torch.int32, 1)])
def test_unpack_equals_the_shifts(shape, dtype, k):
    g = torch.Generator().manual_seed(0)
    info = torch.iinfo(dtype)
    field = torch.randint(info.min, info.max, shape, dtype=torch.int64, generator=g).to(dtype)
    out = torch.empty((k, *shape), dtype=torch.bool)
    unpack_into(field, out)
    assert torch.equal(out, unpack_bits_reference(field[None, None], k)[0])


@pytest.mark.parametrize("offset", [0, 1, 7, 31])
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_unpack_at_any_output_alignment(offset, dtype):
    """The streaming stores need 32-byte aligned bytes: the head of each plane is peeled."""
    shape, k = (9, 10, 70), 13
    field = torch.randint(0, 2**k, shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    n = field.numel()
    out = torch.empty(k * n + offset, dtype=torch.bool)[offset:].view(k, *shape)
    unpack_into(field, out)
    assert torch.equal(out, unpack_bits_reference(field[None, None], k)[0])


def test_wrong_arguments_raise():
    field = torch.zeros(4, 4, 4, dtype=torch.int16)
    with pytest.raises(TypeError):
        unpack_into(field.long(), torch.empty(3, 4, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError):
        unpack_into(field, torch.empty(3, 4, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        unpack_into(field, torch.empty(3, 4, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        unpack_into(field, torch.empty(17, 4, 4, 4, dtype=torch.bool))  # 17 bits of int16
    with pytest.raises(ValueError):
        unpack_into(field.transpose(0, 2), torch.empty(3, 4, 4, 4, dtype=torch.bool))
