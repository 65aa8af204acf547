"""Masked-volume reconstruction: the same-budget baseline for in-context segmentation.

Random cubic blocks of each augmented crop are zeroed and the network restores them;
the loss is the mean squared error on the zeroed voxels only (the visible ones would
be copied, not learned). The network is the in-context network's ``Encoder`` of the same
preset plus a light U-Net decoder, and its state_dict keeps the encoder under
``encoder.`` exactly as ``InContextSegNet`` does: evaluation loads those weights into an
in-context network, so the two pretexts' encoders are compared on the same downstream
tasks after the same pretraining budget.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from maskbank.train.incontext_net import NetSpec, build_encoder
from maskbank.train.pretext.base import Pretext, PretextError, PretextOutput, normalise
from maskbank.train.resenc import checked_spec
from maskbank.train.run_config import TrainConfig


class UpStage(nn.Module):
    """Transposed-conv upsampling + skip add: the cheapest decoder that sees every level."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, 2, stride=2, bias=False)
        self.norm = nn.InstanceNorm3d(cout, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.up(x) + skip))


class ReconstructionNet(nn.Module):
    """forward(masked_image) -> reconstructed image (N, in_channels, D, H, W)."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        ch = spec.channels
        self.encoder = build_encoder(spec)  # the same module (and keys) as InContextSegNet's
        self.decoder = nn.ModuleList(UpStage(ch[i + 1], ch[i]) for i in range(len(ch) - 1))
        self.head = nn.Conv3d(ch[0], spec.in_channels, 1)

    @property
    def min_size(self) -> int:
        """Crop edges must be multiples of this."""
        return 2 ** (len(self.spec.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.min_size for s in x.shape[-3:]):
            raise ValueError(f"crop {tuple(x.shape[-3:])} not a multiple of {self.min_size}")
        feats = self.encoder(x)
        y = feats[-1]
        for lv in range(len(feats) - 2, -1, -1):
            y = self.decoder[lv](y, feats[lv])
        return self.head(y)


def block_mask(
    n: int, shape: tuple[int, int, int], block: int, ratio: float, gen: torch.Generator
) -> torch.Tensor:
    """(n,1,*shape) bool, True on ``round(ratio * blocks)`` random cubic blocks per sample.

    Drawn from ``gen`` (the step's augmentation generator, on its own device), so a resumed
    run masks the same blocks. Blocks at the far edges are cut when ``block`` does not
    divide the crop.
    """
    grid = [math.ceil(s / block) for s in shape]
    n_blocks = math.prod(grid)
    n_mask = min(n_blocks, max(1, round(ratio * n_blocks)))
    noise = torch.rand(n, n_blocks, generator=gen, device=gen.device)
    ids = noise.argsort(dim=1)[:, :n_mask]
    mask = torch.zeros(n, n_blocks, dtype=torch.bool, device=gen.device)
    mask.scatter_(1, ids, True)
    mask = mask.view(n, 1, *grid)
    for axis in range(3):
        mask = mask.repeat_interleave(block, dim=2 + axis)
    d, h, w = shape
    return mask[..., :d, :h, :w]


class ReconstructionPretext(Pretext):
    """Zero random blocks of the reference and query crops; MSE on the zeroed voxels."""

    name = "reconstruction"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        crop = cfg.data.crop
        block = cfg.reconstruction.block
        self.block = block if block is not None else max(1, crop // 4)
        self.mask_ratio = cfg.reconstruction.mask_ratio
        if not 1 <= self.block <= crop:
            raise PretextError(f"reconstruction.block={self.block} must lie in 1..{crop} (crop)")
        if not 0.0 < self.mask_ratio < 1.0:
            raise PretextError(f"reconstruction.mask_ratio={self.mask_ratio} must lie in (0, 1)")

    def build_model(self, preset: str | dict) -> nn.Module:
        try:
            return ReconstructionNet(checked_spec(preset, self.cfg.model.encoder))
        except ValueError as exc:
            raise PretextError(str(exc)) from exc

    def __call__(
        self,
        net: nn.Module,
        aug: dict[str, torch.Tensor],
        gen: torch.Generator,
        bf16: bool = False,
    ) -> PretextOutput:
        # Both crops: the same number of encoder passes as the in-context step.
        target = torch.cat([aug["ref_image"], aug["query_image"]], dim=0).float()
        shape = tuple(target.shape[-3:])
        mask = block_mask(target.shape[0], shape, self.block, self.mask_ratio, gen)
        mask = mask.to(target.device)
        masked = target.masked_fill(mask, 0.0)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            pred = net(masked)
        weight = mask.float()
        mse = ((pred.float() - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)
        visuals = {"masked": masked, "pred": pred, "target": target, "mask": mask}
        return PretextOutput(mse, {"recon_mse": float(mse.detach())}, visuals)

    def image_tiles(
        self, aug: dict[str, torch.Tensor], out: PretextOutput
    ) -> tuple[str, list[torch.Tensor]]:
        v = out.visuals
        i = aug["ref_image"].shape[0]  # the first query crop
        mid = v["target"].shape[-1] // 2
        target = v["target"][i, 0, :, :, mid].float()
        lo, hi = target.min(), target.max()

        def scaled(x: torch.Tensor) -> torch.Tensor:  # the target's range: tiles comparable
            return ((x.float() - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)

        tiles = [
            scaled(v["masked"][i, 0, :, :, mid]),
            v["mask"][i, 0, :, :, mid].float(),
            scaled(v["pred"][i, 0, :, :, mid]),
            normalise(target),
        ]
        return "recon/masked_mask_pred_target", tiles
