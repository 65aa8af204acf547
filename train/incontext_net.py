"""Iris-style in-context segmentation network.

Given a reference image with K binary masks and a query image, predict the same
K structures in the query, all in one forward pass:

* a shared 3D residual U-Net encoder (instance norm) runs on reference and query;
* task encoding at the deeper scales: per task one foreground token (reference
  features averaged under the mask, weighted by the mask's occupancy of each
  feature voxel, so the full-resolution mask is used exactly and tiny structures
  still count) plus ``n_query_tokens`` learnable tokens that attend over
  mask-fused reference features, then self-attend within the task;
* a decoder over the query features that cross-attends to the tasks' tokens at
  those scales: to all tasks' tokens at once (one decoder pass, the published design), or,
  with ``per_task``, to one task's tokens per pass (K passes): a joint pass must carry
  every task's answer in the finest decoder features, which the dynamic head then reads
  linearly -- with a narrow network (8 channels at full resolution) that bottleneck keeps
  K different structures from being told apart;
* a dynamic head: per task a linear kernel generated from its tokens and a
  full-resolution foreground token, applied to the final decoder features;
* optionally (``prior_levels``) a similarity prior added to the logits: per task and
  level, the cosine between the query's encoder features and the task's foreground token
  (both centred on the query's mean feature), upsampled, with a learnt scale and offset.
  It hands the network "looks like the reference structure" from the first step; without
  it a small network trained for minutes learns only the foreground prior (its
  probabilities inside and outside the target were measured equal on held-out pairs);
* optionally (``readout="propagation"``) a mask-propagation readout at ``readout_level``
  (``train.readout``): query voxels attend over the reference's voxels by learnt keys and
  read the reference masks through that attention; the propagated masks are added to the
  logits (``readout_context``: the keys also see the next coarser level). The task
  embedding then keeps the reference's keys and mask occupancy at that level (its
  "memory"), so evaluation still encodes a reference once.

The architecture's hyper-parameters and presets are ``train.net_spec``; what the network
keeps of a reference is ``train.task_embedding``; both are re-exported here, so imports
from this module keep working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maskbank.train.net_spec import PRESETS, NetSpec, resolve_spec
from maskbank.train.readout import LocalRefine, PropagationReadout
from maskbank.train.task_embedding import TaskEmbedding

__all__ = [
    "PRESETS",
    "InContextSegNet",
    "NetSpec",
    "TaskEmbedding",
    "build_encoder",
    "build_model",
    "count_parameters",
    "resolve_spec",
]


def _norm(c: int) -> nn.Module:
    return nn.InstanceNorm3d(c, affine=True)


class ResBlock(nn.Module):
    """conv-IN-act-conv-IN + identity: the standard residual U-Net block."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv3d(c, c, 3, padding=1, bias=False)
        self.norm1 = _norm(c)
        self.conv2 = nn.Conv3d(c, c, 3, padding=1, bias=False)
        self.norm2 = _norm(c)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + x)


def _conv_norm_act(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2 if stride == 1 else 0, bias=False),
        _norm(cout),
        nn.LeakyReLU(0.01, inplace=True),
    )


class Encoder(nn.Module):
    """Residual encoder; level i runs at 1/2**i of the input resolution."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.stages = nn.ModuleList()
        cin = spec.in_channels
        for i, (c, n) in enumerate(zip(spec.channels, spec.enc_blocks, strict=True)):
            entry = _conv_norm_act(cin, c, 3) if i == 0 else _conv_norm_act(cin, c, 2, stride=2)
            self.stages.append(nn.Sequential(entry, *[ResBlock(c) for _ in range(n)]))
            cin = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def build_encoder(spec: NetSpec) -> nn.Module:
    """The encoder ``spec.encoder`` names; both return one feature map per level, level i at
    1/2**i of the input, so task encoding and decoder do not depend on the choice."""
    if spec.encoder == "iris":
        return Encoder(spec)
    if spec.encoder == "resenc":
        from maskbank.train.resenc import build_resenc_encoder

        return build_resenc_encoder(spec)
    raise ValueError(f"unknown encoder {spec.encoder!r}; choose 'iris' or 'resenc'")


class Attention(nn.Module):
    """Pre-norm multi-head attention with residual, built on SDPA (torch >= 2.0)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(self.norm_q(x)).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(context)).chunk(2, dim=-1)
        k = k.reshape(b, -1, h, d // h).transpose(1, 2)
        v = v.reshape(b, -1, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * dim
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def mask_occupancy(masks: torch.Tensor, level: int) -> torch.Tensor:
    """Fraction of each level-``level`` voxel covered by each mask: (N,K,D,H,W) -> (N,K,d,h,w)."""
    if level == 0:
        return masks
    return F.avg_pool3d(masks, kernel_size=2**level, stride=2**level)


def pooled_token(feat: torch.Tensor, occ: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean of features per task: (N,C,*S), (N,K,*S) -> (N,K,C)."""
    num = torch.einsum("nc...,nk...->nkc", feat, occ)
    den = occ.flatten(2).sum(-1).unsqueeze(-1)
    return num / den.clamp_min(1e-6)


class TaskEncoder(nn.Module):
    """Task tokens at one scale: foreground token + learnable query tokens."""

    def __init__(self, dim: int, n_query: int, head_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_query, dim) * 0.02)
        self.fg_embed = nn.Parameter(torch.zeros(dim))
        self.bg_embed = nn.Parameter(torch.zeros(dim))
        self.cross = Attention(dim, head_dim)
        self.self_attn = Attention(dim, head_dim)
        self.mlp = MLP(dim)

    def forward(self, feat: torch.Tensor, occ: torch.Tensor) -> torch.Tensor:
        """feat (N,C,*S), occ (N,K,*S) -> tokens (N,K,1+n_query,C)."""
        n, c = feat.shape[:2]
        k = occ.shape[1]
        fg = pooled_token(feat, occ)  # (N,K,C)
        flat = feat.flatten(2).transpose(1, 2)  # (N,L,C)
        w = occ.flatten(2).unsqueeze(-1)  # (N,K,L,1)
        # Mask-fused reference features, one copy per task.
        fg_e, bg_e = self.fg_embed.to(feat.dtype), self.bg_embed.to(feat.dtype)  # stay bf16
        fused = flat.unsqueeze(1) + w * fg_e + (1 - w) * bg_e  # (N,K,L,C)
        fused = fused.reshape(n * k, -1, c)
        q = self.query.to(feat.dtype).expand(n * k, -1, -1)
        q = self.cross(q, fused)
        tokens = torch.cat([fg.reshape(n * k, 1, c), q], dim=1)
        tokens = self.mlp(self.self_attn(tokens, tokens))
        return tokens.view(n, k, -1, c)


class DecoderStage(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, 2, stride=2, bias=False)
        self.merge = _conv_norm_act(2 * cout, cout, 3)
        self.blocks = nn.Sequential(*[ResBlock(cout) for _ in range(blocks)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.merge(torch.cat([self.up(x), skip], dim=1)))


class InContextSegNet(nn.Module):
    """forward(ref_image, ref_masks, query_image) -> logits (N, K, D, H, W)."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        ch = spec.channels
        levels = len(ch)
        if any(not 0 < lvl < levels for lvl in spec.token_levels):
            raise ValueError(f"token_levels {spec.token_levels} must lie in 1..{levels - 1}")
        self.encoder = build_encoder(spec)
        self.task_encoders = nn.ModuleDict(
            {
                str(lv): TaskEncoder(ch[lv], spec.n_query_tokens, spec.head_dim)
                for lv in spec.token_levels
            }
        )
        self.fuse = nn.ModuleDict(
            {str(lv): Attention(ch[lv], spec.head_dim) for lv in spec.token_levels}
        )
        self.decoder = nn.ModuleList(
            DecoderStage(ch[i + 1], ch[i], spec.dec_blocks) for i in range(levels - 1)
        )
        if any(lv != 0 and lv not in spec.token_levels for lv in spec.prior_levels):
            raise ValueError(f"prior_levels {spec.prior_levels}: 0 or among token_levels")
        n_prior = len(spec.prior_levels)
        self.prior_scale = nn.Parameter(torch.full((n_prior,), 4.0)) if n_prior else None
        self.prior_offset = nn.Parameter(torch.tensor(-2.0)) if n_prior else None
        if spec.readout not in ("none", "propagation"):
            raise ValueError(f"readout {spec.readout!r}: 'none' or 'propagation'")
        self.readout = None
        if spec.readout == "propagation":
            if not 0 <= spec.readout_level < levels:
                raise ValueError(f"readout_level {spec.readout_level} must lie in 0..{levels - 1}")
            lv = spec.readout_level
            if spec.readout_context and lv + 1 >= levels:
                raise ValueError(f"readout_context needs a level above readout_level {lv}")
            dim = ch[lv] + (ch[lv + 1] if spec.readout_context else 0)
            self.readout = PropagationReadout(dim, spec.readout_dim)
        self.refine = None
        if self.readout is not None and spec.readout_refine > 0:
            self.refine = LocalRefine(spec.readout_refine)
        finest = min(spec.token_levels)
        self.head = nn.Sequential(
            nn.LayerNorm(ch[0] + ch[finest]),
            nn.Linear(ch[0] + ch[finest], 2 * ch[0]),
            nn.GELU(),
            nn.Linear(2 * ch[0], ch[0] + 1),
        )

    @property
    def min_size(self) -> int:
        """Crop edges must be multiples of this."""
        return 2 ** (len(self.spec.channels) - 1)

    def _fuse(self, level: int, feat: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        n, c = feat.shape[:2]
        flat = feat.flatten(2).transpose(1, 2)
        flat = self.fuse[str(level)](flat, tokens.reshape(n, -1, c))
        return flat.transpose(1, 2).reshape(feat.shape)

    def _check_crop(self, shape: torch.Size) -> None:
        if any(s % self.min_size for s in shape[-3:]):
            raise ValueError(f"crop {tuple(shape[-3:])} not a multiple of {self.min_size}")

    def _tasks(self, ref_feats: list[torch.Tensor], ref_masks: torch.Tensor) -> TaskEmbedding:
        masks = ref_masks.to(ref_feats[0].dtype)
        tokens = {
            lv: self.task_encoders[str(lv)](ref_feats[lv], mask_occupancy(masks, lv))
            for lv in self.spec.token_levels
        }
        fg0 = pooled_token(ref_feats[0], masks)  # full-resolution foreground token
        if self.readout is None:
            return TaskEmbedding(tokens, fg0)
        lv = self.spec.readout_level
        mem_keys = self.readout.keys(self._key_features(ref_feats))[
            :, None
        ]  # (N, 1, L, C): shared by tasks
        mem_masks = mask_occupancy(masks, lv).flatten(2).float()
        if self.spec.readout_gain != 1.0:
            mem_masks = (mem_masks * self.spec.readout_gain).clamp(max=1.0)
        return TaskEmbedding(tokens, fg0, mem_keys, mem_masks)

    def _prior(self, q_feats: list[torch.Tensor], tasks: TaskEmbedding) -> torch.Tensor:
        """Similarity prior logits (N, K, *S): scaled cosines to each task's foreground token."""
        size = q_feats[0].shape[-3:]
        total = self.prior_offset.float()
        for i, lv in enumerate(self.spec.prior_levels):
            feat = q_feats[lv].float()
            proto = (tasks.fg0 if lv == 0 else tasks.tokens[lv][:, :, 0]).float()
            mean = feat.flatten(2).mean(-1)  # (N, C): centre on the query's average voxel
            f = F.normalize(feat - mean[..., None, None, None], dim=1)
            p = F.normalize(proto - mean[:, None], dim=-1)
            cos = torch.einsum("nc...,nkc->nk...", f, p)
            if cos.shape[-3:] != size:
                cos = F.interpolate(cos, size=size, mode="trilinear", align_corners=False)
            total = total + self.prior_scale[i] * cos
        return total

    def _decode(
        self, q_feats: list[torch.Tensor], tasks: TaskEmbedding, image: torch.Tensor
    ) -> torch.Tensor:
        n = q_feats[0].shape[0]
        tasks = tasks.expand(n)
        k = tasks.n_tasks
        prior = self._prior(q_feats, tasks) if self.spec.prior_levels else None
        readout = None
        if self.readout is not None and tasks.mem_keys is not None:
            readout = self._readout(q_feats, tasks)
        tokens = tasks.tokens
        if self.spec.per_task:  # batch of N * K passes, each attending to one task's tokens
            q_feats = [f.repeat_interleave(k, dim=0) for f in q_feats]
            tokens = {lv: t.reshape(n * k, 1, *t.shape[2:]) for lv, t in tokens.items()}
        x = q_feats[-1]
        top = len(q_feats) - 1
        if top in tokens:
            x = self._fuse(top, x, tokens[top])
        for lv in range(top - 1, -1, -1):
            x = self.decoder[lv](x, q_feats[lv])
            if lv in tokens:
                x = self._fuse(lv, x, tokens[lv])
        finest = min(self.spec.token_levels)
        kernel = self.head(torch.cat([tasks.fg0, tasks.tokens[finest].mean(dim=2)], dim=-1))
        weight, bias = kernel[..., :-1], kernel[..., -1]
        if self.spec.per_task:
            x = x.view(n, k, *x.shape[1:])
            logits = torch.einsum("nkc...,nkc->nk...", x, weight.to(x.dtype))
        else:
            logits = torch.einsum("nc...,nkc->nk...", x, weight.to(x.dtype))
        logits = logits + bias.to(x.dtype)[..., None, None, None]
        if prior is not None:
            logits = logits + prior.to(logits.dtype)
        if readout is not None:
            logits = logits + self.readout.logits(readout).to(logits.dtype)
            if self.refine is not None:
                logits = self.refine(logits, readout, image)
        return logits

    def _readout(self, q_feats: list[torch.Tensor], tasks: TaskEmbedding) -> torch.Tensor:
        """The reference masks propagated to the query, upsampled to it: (N, K, *S)."""
        feat = q_feats[self.spec.readout_level]
        keys = self.readout.keys(self._key_features(q_feats))
        prop = self.readout.propagate(keys, tasks.mem_keys, tasks.mem_masks)
        prop = prop.view(feat.shape[0], tasks.n_tasks, *feat.shape[-3:])
        return self.readout.upsample(prop, q_feats[0].shape[-3:])

    def _key_features(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """What the readout's keys are computed from: the readout level's features, with
        ``readout_context`` also the next coarser level's, upsampled (wider context)."""
        lv = self.spec.readout_level
        if not self.spec.readout_context:
            return feats[lv]
        size = feats[lv].shape[-3:]
        up = F.interpolate(feats[lv + 1], size=size, mode="trilinear", align_corners=False)
        return torch.cat([feats[lv], up], dim=1)

    def encode_tasks(self, ref_image: torch.Tensor, ref_masks: torch.Tensor) -> TaskEmbedding:
        """Task embeddings of K structures from a reference: (N,1,*S), (N,K,*S) -> (N, K tasks).

        Evaluation encodes references once (averaging several shots with
        ``TaskEmbedding.mean``) and reuses them for every window of every query.
        """
        self._check_crop(ref_image.shape)
        return self._tasks(self.encoder(ref_image), ref_masks)

    def segment(self, query_image: torch.Tensor, tasks: TaskEmbedding) -> torch.Tensor:
        """Logits (N,K,*S) of the tasks in a query crop; tasks of batch 1 are broadcast."""
        self._check_crop(query_image.shape)
        return self._decode(self.encoder(query_image), tasks, query_image)

    def forward(
        self, ref_image: torch.Tensor, ref_masks: torch.Tensor, query_image: torch.Tensor
    ) -> torch.Tensor:
        if ref_image.shape[-3:] != query_image.shape[-3:]:
            raise ValueError("reference and query crops must have the same shape")
        self._check_crop(ref_image.shape)
        n = ref_image.shape[0]
        # One encoder pass over reference and query together (shared weights).
        feats = self.encoder(torch.cat([ref_image, query_image], dim=0))
        tasks = self._tasks([f[:n] for f in feats], ref_masks)
        return self._decode([f[n:] for f in feats], tasks, query_image)


def build_model(preset: str | NetSpec | dict) -> InContextSegNet:
    """Registry entry point: a preset name, a NetSpec, or a dict of NetSpec fields."""
    return InContextSegNet(resolve_spec(preset))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
