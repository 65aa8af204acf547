"""Mask-propagation readout: the reference's masks carried to the query by feature matching.

Each query voxel of one encoder level attends over the reference's voxels of that level
(cosine of learnt keys, a learnt inverse temperature, softmax over reference positions
plus one learnt "no match" slot whose value is 0) and reads each task's reference mask
occupancy through that attention -- the way space-time memory networks propagate object
masks between video frames. The propagated masks, upsampled to the crop, are added to the
decoder's logits with a learnt scale and offset.

Why it is there: a small network trained for minutes on the in-context pretext learnt only
a foreground prior (its probability inside and outside the target were measured equal on
held-out pairs); the tokens the decoder attends to summarise a reference mask into a few
vectors, which leaves the "where" to be rediscovered. The readout hands the network "what
in the query looks like the masked part of the reference" explicitly and from the first
step, and the rest of the network learns to correct it. The no-match slot lets a task be
absent: when no reference voxel matches well, attention goes to the slot and the
propagated mask falls towards 0.

Memory layout (see ``TaskEmbedding``): keys ``(N, Km, L, C)`` with ``Km`` 1 (every task
shares the reference, as in training) or one per task (tasks from different references,
as in evaluation), unit vectors; all-zero key rows are padding and are never attended to.
Masks ``(N, K, L)`` in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PropagationReadout(nn.Module):
    """Keys of one encoder level, and the propagation of reference masks to a query."""

    def __init__(self, dim: int, key_dim: int = 32, temperature: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, key_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        # Score of the no-match slot, in cosine units (a match needs a cosine above it).
        self.no_match = nn.Parameter(torch.tensor(0.5))
        self.weight = nn.Parameter(torch.tensor(6.0))  # logits += weight * mask + offset
        self.offset = nn.Parameter(torch.tensor(-3.0))

    def keys(self, feat: torch.Tensor) -> torch.Tensor:
        """Unit keys of a feature map: (N, C, *S) -> (N, L, key_dim), float32."""
        flat = feat.float().flatten(2).transpose(1, 2)
        return F.normalize(self.key(self.norm(flat)), dim=-1)

    def propagate(
        self, q_keys: torch.Tensor, mem_keys: torch.Tensor, mem_masks: torch.Tensor
    ) -> torch.Tensor:
        """Propagated masks (N, K, Lq) from query keys (N, Lq, C) and a memory."""
        scale = self.log_scale.exp()
        masks = mem_masks.float()
        pad = mem_keys.abs().sum(-1) == 0  # (N, Km, L)
        if mem_keys.shape[1] == 1:  # one reference for every task: one affinity
            score = scale * torch.einsum("nqc,nrc->nqr", q_keys, mem_keys[:, 0].float())
            # Mask after scaling: -inf * scale would make the scale's gradient NaN.
            score = score.masked_fill(pad[:, 0, None, :], float("-inf"))
            attn = self._softmax(score, scale)
            return torch.einsum("nqr,nkr->nkq", attn[..., :-1], masks)
        score = scale * torch.einsum("nqc,nkrc->nkqr", q_keys, mem_keys.float())
        score = score.masked_fill(pad[:, :, None, :], float("-inf"))
        attn = self._softmax(score, scale)
        return torch.einsum("nkqr,nkr->nkq", attn[..., :-1], masks)

    def _softmax(self, scores: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        slot = (scale * self.no_match).expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat([scores, slot], dim=-1), dim=-1)

    @staticmethod
    def upsample(propagated: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """(N, K, d, h, w) propagated masks -> (N, K, *size), trilinear."""
        if propagated.shape[-3:] == size:
            return propagated
        return F.interpolate(propagated, size=size, mode="trilinear", align_corners=False)

    def logits(self, propagated: torch.Tensor) -> torch.Tensor:
        """Logit offsets of (upsampled) propagated masks."""
        return self.weight * propagated + self.offset


class LocalRefine(nn.Module):
    """Per task, a small full-resolution correction of the logits from local evidence.

    Input per task: its logits, its propagated mask (upsampled) and the query image; a
    3^3 convolution to ``hidden`` channels, then 1^3 to one logit offset (zero at
    initialisation). The propagation is matched at a coarse level; this lets edges of the
    query image move its boundary.
    """

    def __init__(self, hidden: int = 4):
        super().__init__()
        self.conv = nn.Conv3d(3, hidden, 3, padding=1)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.out = nn.Conv3d(hidden, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, logits: torch.Tensor, propagated: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """logits, propagated (N, K, *S), image (N, 1, *S) -> refined logits (N, K, *S)."""
        n, k = logits.shape[:2]
        size = logits.shape[-3:]
        x = torch.stack(
            [logits.float(), propagated.float(), image.float().expand(n, k, *size)], dim=2
        ).reshape(n * k, 3, *size)
        return logits + self.out(self.act(self.conv(x))).view(n, k, *size).to(logits.dtype)
