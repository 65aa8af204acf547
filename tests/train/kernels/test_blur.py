from __future__ import annotations

import pytest
import torch

from train.augment.blur import gaussian_blur_reference, gaussian_taps
from train.kernels.blur import filter_volume


@pytest.mark.parametrize("shape", [(2, 4, 7), (20, 9, 16), (1, 1, 5), (33, 31, 29)])
@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_compiled_filter_equals_the_shifted_views(shape, sigma):
    img = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    sig = torch.tensor([sigma])
    got = filter_volume(img[0, 0], gaussian_taps(sig)[0])
    assert (got - gaussian_blur_reference(img, sig)[0, 0]).abs().max() < 1e-5


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
