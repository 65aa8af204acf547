"""Weak (reference) and strong (query) augmentation of a batch of crop pairs."""

from __future__ import annotations

import torch

from maskbank.train.augment.intensity import intensity_augment
from maskbank.train.augment.mask_bits import unpack_bits
from maskbank.train.augment.spatial import center_crop, random_affine, warp
from maskbank.train.augment.spec import STRONG, WEAK, AugmentSpec


class PairAugmenter:
    """Weak augmentation for the reference, strong for the query, batched on one device."""

    def __init__(
        self,
        crop: int,
        weak: AugmentSpec = WEAK,
        strong: AugmentSpec = STRONG,
        geometry: bool = False,
    ):
        self.crop = crop
        self.weak = weak
        self.strong = strong
        self.geometry = geometry  # also return the affines drawn (``train.reference_view``)

    def _one(self, image, bits, spec, gen, n_tasks):
        n = image.shape[0]
        mat = random_affine(n, spec, gen, image.device)
        warped = ~torch.all(mat == torch.eye(3, device=mat.device), dim=(1, 2))
        # out_img is always a fresh tensor here, so intensity ops may work in place on it.
        if bool(warped.all()):
            out_img, out_bits = warp(image, bits, mat, self.crop, n_tasks)
            return intensity_augment(out_img, spec, gen, inplace=True), out_bits, mat
        out_img = center_crop(image, self.crop).to(torch.float32, copy=True)
        out_bits = center_crop(bits, self.crop)  # a view: only unpacked
        if bits.dtype != torch.int16 or bool(warped.any()):
            out_bits = out_bits.to(torch.int32)  # int16 (<= 16 bits): kept, the same low bits
        if bool(warped.any()):  # only samples that drew an affine pay for the warp
            idx = warped.nonzero().flatten()
            out_bits = out_bits.clone()
            # int32 fields here (n_bits None): they go into the int32 crops.
            out_img[idx], out_bits[idx] = warp(image[idx], bits[idx], mat[idx], self.crop)
        return intensity_augment(out_img, spec, gen, inplace=True), out_bits, mat

    @torch.no_grad()
    def __call__(
        self, batch: dict[str, torch.Tensor], n_tasks: int, gen: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """batch: ref_image/query_image (n,1,*S) float32 or float16, ref_bits/query_bits
        (n,1,*S) int32, or int16 holding the n_tasks <= 16 bits (``PairStream(compact=True)``).

        Returns images (n,1,crop^3) float32 and masks (n,n_tasks,crop^3) bool: the same for
        both input types (float16 values are exact in float32). With ``geometry`` also
        ``ref_affine``/``query_affine`` (n,3,3) float32: each output voxel offset's input
        offset, identity where none was drawn.
        """
        ref_img, ref_b, ref_m = self._one(
            batch["ref_image"], batch["ref_bits"], self.weak, gen, n_tasks
        )
        q_img, q_b, q_m = self._one(
            batch["query_image"], batch["query_bits"], self.strong, gen, n_tasks
        )
        out = {
            "ref_image": ref_img,
            "ref_masks": unpack_bits(ref_b, n_tasks),
            "query_image": q_img,
            "query_masks": unpack_bits(q_b, n_tasks),
        }
        if self.geometry:
            out["ref_affine"], out["query_affine"] = ref_m.float(), q_m.float()
        return out
