from __future__ import annotations

import torch
import torch.nn.functional as F

from maskbank.train.augment.blur import gaussian_blur, gaussian_blur_reference


def test_blur_matches_conv3d_with_replicate_padding():
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
        assert torch.allclose(gaussian_blur_reference(img, sigma)[j : j + 1], x, atol=1e-5)
        assert torch.allclose(gaussian_blur(img, sigma)[j : j + 1], x, atol=1e-5)
        assert torch.allclose(gaussian_blur(img[j : j + 1], sigma[j : j + 1]), x, atol=1e-5)
        own = img[j : j + 1].clone()
        assert gaussian_blur(own, sigma[j : j + 1], inplace=True) is own
        assert torch.allclose(own, x, atol=1e-5)
