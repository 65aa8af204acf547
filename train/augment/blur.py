"""Separable Gaussian blur with a per-sample sigma and replicate borders."""

from __future__ import annotations

import torch

from maskbank.train.kernels.blur import filter_volume

RADIUS = 3  # 7 taps: covers +-3 sigma of the largest default sigma (1.0)


def gaussian_taps(sigma: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, 2 * RADIUS + 1) normalised Gaussian taps, one row per sigma."""
    t = torch.arange(-RADIUS, RADIUS + 1, device=sigma.device, dtype=dtype)
    kern = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(dtype) ** 2))
    return kern / kern.sum(1, keepdim=True)


def gaussian_blur_reference(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The torch route, any device; img (n,1,X,Y,Z), sigma (n,).

    Each axis is a symmetric 7-tap sum of shifted views (4 products, 6 adds per voxel),
    for the whole batch at once without host syncs.
    """
    w = gaussian_taps(sigma, img.dtype).view(img.shape[0], 1, 1, 1, 1, -1)
    x = img
    for dim in (2, 3, 4):
        size = x.shape[dim]
        idx = torch.arange(-RADIUS, size + RADIUS, device=img.device).clamp(0, size - 1)
        xp = x.index_select(dim, idx)  # replicate padding along dim
        acc = xp.narrow(dim, RADIUS, size) * w[..., RADIUS]
        for r in range(1, RADIUS + 1):
            pair = xp.narrow(dim, RADIUS - r, size) + xp.narrow(dim, RADIUS + r, size)
            acc.add_(pair.mul_(w[..., RADIUS + r]))
        x = acc
    return x


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``gaussian_blur_reference``; float32 on the CPU through the compiled loop
    (``train.kernels.blur``, ~15x cheaper: the shifted views cost a pass each), written into
    ``img`` itself when ``inplace`` (no output volume, no copy back)."""
    if img.device.type != "cpu" or img.dtype != torch.float32:
        return gaussian_blur_reference(img, sigma)
    taps = gaussian_taps(sigma.cpu())
    out = img if inplace and img.is_contiguous() else torch.empty_like(img)
    for i in range(img.shape[0]):
        filter_volume(img[i, 0], taps[i], out[i, 0])
    return out
