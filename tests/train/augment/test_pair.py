from __future__ import annotations

from dataclasses import replace

import torch

from maskbank.train.augment import NONE, STRONG, PairAugmenter
from maskbank.train.augment.mask_bits import pack_bits
from maskbank.train.augment.spatial import center_crop


def _blob(s=48):
    r = torch.arange(s, dtype=torch.float32) - s / 2
    x, y, z = torch.meshgrid(r, r, r, indexing="ij")
    m1 = ((x - 4) ** 2 / 100 + y**2 / 36 + (z + 3) ** 2 / 64) <= 1
    m2 = (x.abs() < 12) & (y > 5) & (y < 14) & (z.abs() < 9)
    return torch.stack([m1, m2])[None]


def _batch(masks):
    img = masks[:, :1].float()
    return {
        "ref_image": img,
        "ref_bits": pack_bits(masks),
        "query_image": img,
        "query_bits": pack_bits(masks),
    }


def test_image_and_masks_move_together():
    """Image = mask 0 as intensities: after a strong affine, image > 0.5 matches warped mask 0."""
    masks = _blob()
    spatial_only = replace(NONE, p_affine=1.0, shear=STRONG.shear)
    out = PairAugmenter(32, weak=NONE, strong=spatial_only)(
        _batch(masks), 2, torch.Generator().manual_seed(3)
    )
    warped_img, warped_mask = out["query_image"][0, 0] > 0.5, out["query_masks"][0, 0]
    assert not torch.equal(warped_mask, center_crop(masks, 32)[0, 0])  # it really moved
    assert (warped_img == warped_mask).float().mean() > 0.97
    assert torch.equal(out["ref_masks"], center_crop(masks, 32))  # NONE = centre crop


def test_same_generator_same_pairs():
    batch = _batch(_blob())
    a = PairAugmenter(32)(batch, 2, torch.Generator().manual_seed(5))
    b = PairAugmenter(32)(batch, 2, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compact_batches_give_the_wide_batches_output():
    """float16 images / int16 bits (PairStream(compact=True)) == the float32 / int32 batch."""
    g = torch.Generator().manual_seed(3)
    wide = {
        "ref_image": torch.randn(2, 1, 24, 24, 24, generator=g).half().float(),
        "query_image": torch.randn(2, 1, 24, 24, 24, generator=g).half().float(),
        "ref_bits": torch.randint(0, 2**14, (2, 1, 24, 24, 24), dtype=torch.int32, generator=g),
        "query_bits": torch.randint(0, 2**14, (2, 1, 24, 24, 24), dtype=torch.int32, generator=g),
    }
    wide["ref_bits"][0, 0, :3] |= 1 << 14  # the top task bit (K + 1 = 15)
    compact = {k: v.half() if "image" in k else v.to(torch.int16) for k, v in wide.items()}
    aug = PairAugmenter(16)
    seen_mixed = False
    for seed in range(4):  # weak: identity, warped and mixed batches
        a = aug(wide, 15, torch.Generator().manual_seed(seed))
        b = aug(compact, 15, torch.Generator().manual_seed(seed))
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (seed, key)
        seen_mixed |= (
            0 < (a["ref_image"] != center_crop(wide["ref_image"], 16)).flatten(1).any(1).sum() < 2
        )
    assert seen_mixed
