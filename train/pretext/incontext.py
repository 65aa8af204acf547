"""In-context segmentation: segment the reference's K masks in the query (the main pretext)."""

from __future__ import annotations

import torch
from torch import nn

from maskbank.train.incontext_net import InContextSegNet
from maskbank.train.pretext.base import Pretext, PretextError, PretextOutput, normalise
from maskbank.train.resenc import checked_spec
from maskbank.train.seg_loss import segmentation_loss
from maskbank.train.validation import fills_crop


class InContextPretext(Pretext):
    """``model(ref_image, ref_masks, query_image)`` + adaptive Tversky/BCE on the query masks.

    Logs, besides the loss parts, what the pairs asked of the network: ``absent_share``, the
    share of proposal tasks (the global task aside) whose structure is absent from the
    augmented query, and ``ref_fill``, the share whose reference mask fills its crop.
    """

    name = "incontext"

    def build_model(self, preset: str | dict) -> nn.Module:
        try:
            return InContextSegNet(checked_spec(preset, self.cfg.model.encoder))
        except ValueError as exc:
            raise PretextError(str(exc)) from exc

    def __call__(
        self,
        net: nn.Module,
        aug: dict[str, torch.Tensor],
        gen: torch.Generator,
        bf16: bool = False,
    ) -> PretextOutput:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = net(aug["ref_image"], aug["ref_masks"], aug["query_image"])
        w = self.cfg.loss
        loss, parts = segmentation_loss(  # in float32
            logits, aug["query_masks"], None, w.tversky_weight, w.bce_weight, w.focal_gamma
        )
        with torch.no_grad():
            tasks = aug["query_masks"][:, :-1]  # the last task is the all-ones global one
            parts["absent_share"] = float((~tasks.flatten(2).any(-1)).float().mean())
            parts["ref_fill"] = float(fills_crop(aug["ref_masks"][:, :-1]).float().mean())
        return PretextOutput(loss, parts, {"logits": logits})

    def image_tiles(
        self, aug: dict[str, torch.Tensor], out: PretextOutput
    ) -> tuple[str, list[torch.Tensor]]:
        mid = aug["ref_image"].shape[-1] // 2
        tiles = [
            normalise(aug["ref_image"][0, 0, :, :, mid]),
            aug["ref_masks"][0, 0, :, :, mid].float(),
            normalise(aug["query_image"][0, 0, :, :, mid]),
            aug["query_masks"][0, 0, :, :, mid].float(),
            torch.sigmoid(out.visuals["logits"][0, 0, :, :, mid].float()),
        ]
        return "pairs/ref_refmask_query_target_pred", tiles
