from __future__ import annotations

import pytest
import torch

from maskbank.train.augment.blur import gaussian_blur_reference, gaussian_taps
from maskbank.train.kernels.blur import filter_volume


@pytest.mark.parametrize("shape", [(2, 4, 7), (20, 9, 16), (1, 1, 5), (33, 31, 29)])
@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_compiled_filter_equals_the_shifted_views(shape, sigma):
    img = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    sig = torch.tensor([sigma])
    got = filter_volume(img[0, 0], gaussian_taps(sig)[0])
    assert (got - gaussian_blur_reference(img, sig)[0, 0]).abs().max() < 1e-5


def test_compiled_filter_in_place_and_into_out():
    img = torch.randn(17, 12, 9, generator=torch.Generator().manual_seed(3))
    sig = torch.tensor([0.7])
    want = gaussian_blur_reference(img[None, None], sig)[0, 0]
    out = torch.full_like(img, float("nan"))
    assert filter_volume(img, gaussian_taps(sig)[0], out) is out
    assert (out - want).abs().max() < 1e-5
    vol = img.clone()
    assert filter_volume(vol, gaussian_taps(sig)[0], vol) is vol
    assert (vol - want).abs().max() < 1e-5


def test_wrong_arguments_raise():
    vol, taps = torch.zeros(4, 4, 4), torch.ones(7) / 7
    with pytest.raises(TypeError):
        filter_volume(vol.double(), taps)
    with pytest.raises(TypeError):
        filter_volume(vol, taps.double())
    with pytest.raises(ValueError):
        filter_volume(vol, torch.ones(6) / 6)  # even taps
    with pytest.raises(ValueError):
        filter_volume(vol[0], taps)
    with pytest.raises(TypeError):
        filter_volume(vol, taps, torch.zeros(4, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError):
        filter_volume(vol, taps, torch.zeros(4, 4, 8)[..., ::2])  # not contiguous
    with pytest.raises(ValueError):
        filter_volume(vol, taps, torch.zeros(4, 4, 5))
