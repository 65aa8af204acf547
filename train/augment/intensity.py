"""Per-sample intensity augmentations, one formula each, the same code on every device.

Each operation draws, for the whole batch and in a fixed order, who applies it
(Bernoulli) and its parameter; then it runs on the samples that drew it. On the CPU
an operation no sample drew costs nothing and the others work in place on the drawn
samples only (no whole-batch temporaries); on other devices it runs on the whole batch
and is masked per sample, which avoids a host sync per operation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from maskbank.train.augment.blur import gaussian_blur
from maskbank.train.augment.draws import bernoulli, uniform
from maskbank.train.augment.spec import AugmentSpec

_DIMS = (1, 2, 3, 4)

# An operation: (samples (k,1,X,Y,Z) it may modify in place, their parameters (k,), the
# generator) -> the augmented samples.
Operation = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def _per_sample(value: torch.Tensor) -> torch.Tensor:
    return value.view(-1, 1, 1, 1, 1)


def brightness(x: torch.Tensor, factor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x.mul_(_per_sample(factor))


def shift(x: torch.Tensor, fraction: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Adds ``fraction`` of the sample's standard deviation."""
    return x.add_(_per_sample(fraction) * x.std(dim=_DIMS, keepdim=True))


def gamma(x: torch.Tensor, g: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``((x - lo) / range) ** g * range + lo`` per sample, as ``exp(g * log(.))`` (~2x pow).

    The base is floored at 1e-20 (its power, <= 1e-14, vanishes against the range in
    float32): log of 0 or of denormals takes a slow path (~4x), and padded crops have
    many voxels at the minimum.
    """
    lo = x.amin(dim=_DIMS, keepdim=True)
    rng = (x.amax(dim=_DIMS, keepdim=True) - lo).clamp_min(1e-6)
    x.sub_(lo).div_(rng).clamp_min_(1e-20).log_().mul_(_per_sample(g)).exp_()
    return x.mul_(rng).add_(lo)


def contrast(x: torch.Tensor, factor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=_DIMS, keepdim=True)
    return x.sub_(mean).mul_(_per_sample(factor)).add_(mean)


def blur(x: torch.Tensor, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return gaussian_blur(x, sigma, inplace=True)


def noise(x: torch.Tensor, std: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return x.add_(n.mul_(_per_sample(std)))


def _operations(spec: AugmentSpec) -> list[tuple[float, tuple[float, float], Operation]]:
    """(probability, parameter range, operation) in the order of the draws."""
    return [
        (spec.p_brightness, spec.brightness, brightness),
        (spec.p_shift, (-spec.shift, spec.shift), shift),
        (spec.p_gamma, spec.gamma, gamma),
        (spec.p_contrast, spec.contrast, contrast),
        (spec.p_blur, spec.blur_sigma, blur),
        (spec.p_noise, spec.noise_std, noise),
    ]


def intensity_augment(
    img: torch.Tensor, spec: AugmentSpec, gen: torch.Generator, inplace: bool = False
) -> torch.Tensor:
    """Per-sample brightness, shift, gamma, contrast, blur, noise; img (n,1,X,Y,Z).

    The input is not modified unless ``inplace`` (it is then worked on directly on the CPU).
    """
    n, device = img.shape[0], img.device
    owned = inplace
    for p, (lo, hi), op in _operations(spec):
        if p <= 0:
            continue
        drawn = bernoulli(n, p, gen, device)
        value = uniform(n, lo, hi, gen, device)
        if device.type != "cpu":  # whole batch, masked: no host sync
            img = torch.where(_per_sample(drawn), op(img.clone(), value, gen), img)
            continue
        for i in drawn.nonzero().flatten().tolist():
            if not owned:  # the first operation that applies copies the input once
                img, owned = img.clone(), True
            x = img[i : i + 1]
            res = op(x, value[i : i + 1], gen)
            if res.data_ptr() != x.data_ptr():
                x.copy_(res)
    return img
