from __future__ import annotations

from dataclasses import replace

import torch

from maskbank.train.augment import NONE, STRONG
from maskbank.train.augment.intensity import intensity_augment

OPS = ("brightness", "shift", "gamma", "contrast", "blur", "noise")


def test_intensity_ops_apply_only_when_drawn():
    img = torch.randn(3, 1, 24, 24, 24)
    assert torch.equal(intensity_augment(img, NONE, torch.Generator().manual_seed(0)), img)
    for op in OPS:
        spec = replace(STRONG, **{f"p_{o}": float(o == op) for o in OPS})
        out = intensity_augment(img, spec, torch.Generator().manual_seed(1))
        assert out.shape == img.shape and torch.isfinite(out).all()
        assert (out - img).abs().mean() > 1e-3, op
    spec = replace(NONE, p_noise=0.5)  # applied to exactly the samples that drew it
    got = intensity_augment(img, spec, torch.Generator().manual_seed(1))
    drew = torch.rand(3, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal((got != img).flatten(1).any(1), drew)


def _formulas(img, spec, gen):
    """The operations written out for the whole batch (what runs off the CPU), masked."""
    n, dims, view = img.shape[0], (1, 2, 3, 4), (-1, 1, 1, 1, 1)

    def draw(p, lo, hi):
        m = torch.rand(n, generator=gen) < p
        return m.view(view), (lo + (hi - lo) * torch.rand(n, generator=gen)).view(view)

    m, f = draw(spec.p_brightness, *spec.brightness)
    img = torch.where(m, img * f, img)
    m, u = draw(spec.p_shift, -spec.shift, spec.shift)
    img = torch.where(m, img + u * img.std(dim=dims, keepdim=True), img)
    m, g = draw(spec.p_gamma, *spec.gamma)
    lo, hi = img.amin(dim=dims, keepdim=True), img.amax(dim=dims, keepdim=True)
    rng = (hi - lo).clamp_min(1e-6)
    img = torch.where(m, ((img - lo) / rng).clamp_min(0) ** g * rng + lo, img)
    m, f = draw(spec.p_contrast, *spec.contrast)
    mean = img.mean(dim=dims, keepdim=True)
    return torch.where(m, (img - mean) * f + mean, img)


def test_per_sample_in_place_route_equals_the_batch_formulas():
    img = torch.randn(6, 1, 20, 21, 22, generator=torch.Generator().manual_seed(0)) * 3 + 1
    keep = img.clone()
    spec = replace(STRONG, p_brightness=0.5, p_shift=0.5, p_gamma=0.5, p_contrast=0.5)
    spec = replace(spec, p_blur=0.0, p_noise=0.0)
    for seed in range(4):
        got = intensity_augment(img, spec, torch.Generator().manual_seed(seed))
        want = _formulas(img, spec, torch.Generator().manual_seed(seed))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
        assert not torch.equal(got, img)
    assert torch.equal(img, keep)  # the input is never modified ...
    mine = img.clone()  # ... unless handed over with inplace=True
    got = intensity_augment(mine, spec, torch.Generator().manual_seed(0), inplace=True)
    want = intensity_augment(img, spec, torch.Generator().manual_seed(0))
    assert got.data_ptr() == mine.data_ptr() and torch.equal(got, want)
