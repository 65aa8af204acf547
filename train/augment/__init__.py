"""Paired, batched augmentation of reference/query crops (GPU when present, CPU otherwise).

Modules: ``spec`` (what to draw), ``spatial`` (random affine, warp of image and masks),
``mask_bits`` (masks as bit fields), ``intensity`` and ``blur`` (intensity operations),
``pair`` (``PairAugmenter``). Each operation has one torch route that runs on any device;
where the CPU needs a faster one, a compiled route in ``train.kernels`` sits beside it and
tests compare the two.

Defaults (the published MASS/Iris recipe):

=====================  ===================  ====================
                       reference (weak)     query (strong)
=====================  ===================  ====================
affine probability     0.5                  0.8
scale per axis         0.7 .. 1/0.7         0.7 .. 1/0.7
rotation per axis      +-30 deg             +-30 deg
shear                  none                 +-0.2
brightness (x)         p 0.2, 0.75..1.25    p 0.2, 0.75..1.25
additive shift         --                   p 0.2, +-0.1 std
gamma                  p 0.2, 0.7..1.5      p 0.2, 0.7..1.5
contrast               p 0.2, 0.75..1.25    p 0.2, 0.75..1.25
Gaussian blur          --                   p 0.2, sigma 0.5..1.0
Gaussian noise         --                   p 0.2, std 0..0.1
=====================  ===================  ====================

All randomness comes from an explicit ``torch.Generator`` so that a resumed run
re-creates exactly the augmentations of an uninterrupted one.
"""

from maskbank.train.augment.pair import PairAugmenter
from maskbank.train.augment.spec import NONE, STRONG, WEAK, AugmentSpec

__all__ = ["NONE", "STRONG", "WEAK", "AugmentSpec", "PairAugmenter"]
