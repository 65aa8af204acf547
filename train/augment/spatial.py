"""The spatial part: a random affine per sample, and the warp of image and masks through it.

Crops arrive with a margin (``crop + 2 * margin`` voxels); the warp samples the central
``crop``^3 of the output, so it pulls real context from the margin instead of zero
padding. Image and masks go through the same voxel coordinates (linear for the image,
nearest neighbour for the bit-packed masks) so they stay aligned voxel for voxel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from maskbank.train.augment.draws import bernoulli
from maskbank.train.augment.mask_bits import nearest_bits
from maskbank.train.augment.spec import AugmentSpec
from maskbank.train.kernels.warp import warp_volume


def random_affine(n: int, spec: AugmentSpec, gen: torch.Generator, device) -> torch.Tensor:
    """(n,3,3) matrices mapping output offsets to input offsets (voxels, about the centre)."""
    eye = torch.eye(3, device=device).expand(n, 3, 3).clone()
    if spec.p_affine <= 0:
        return eye
    apply = bernoulli(n, spec.p_affine, gen, device)
    lo, hi = spec.scale
    # Log-uniform scale so zoom-in and zoom-out are equally likely.
    scale = torch.exp(
        math.log(lo)
        + (math.log(hi) - math.log(lo)) * torch.rand(n, 3, generator=gen, device=device)
    )
    ang = torch.deg2rad(
        (torch.rand(n, 3, generator=gen, device=device) * 2 - 1) * spec.rotation_deg
    )
    c, s = torch.cos(ang), torch.sin(ang)
    one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1)
    rot = rx.view(n, 3, 3) @ ry.view(n, 3, 3) @ rz.view(n, 3, 3)
    mat = rot @ torch.diag_embed(scale)
    if spec.shear > 0:
        sh = (torch.rand(n, 6, generator=gen, device=device) * 2 - 1) * spec.shear
        shear = torch.eye(3, device=device).expand(n, 3, 3).clone()
        idx = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
        for j, (a, b) in enumerate(idx):
            shear[:, a, b] = sh[:, j]
        mat = mat @ shear
    return torch.where(apply[:, None, None], mat, eye)


def sampling_grid(mat: torch.Tensor, in_size: tuple[int, int, int], out: int) -> torch.Tensor:
    """grid_sample grid (n,out,out,out,3) sampling ``out``^3 centred in ``in_size`` through ``mat``.

    ``mat`` maps output voxel offsets from the crop centre to input voxel offsets
    (x, y, z order). It is rescaled into ``affine_grid``'s normalised
    coordinates, which are in (W, H, D) = (z, y, x) order for an [x, y, z] volume.
    """
    device = mat.device
    size = torch.tensor(in_size, device=device, dtype=torch.float32)
    theta = (2 / (size - 1))[:, None] * mat.float() * ((out - 1) / 2)
    theta = theta.flip(-1).flip(-2)  # xyz -> zyx on both sides
    # Same as F.affine_grid(theta, align_corners=True) (no translation), from three
    # broadcast outer products: several times cheaper.
    r = torch.linspace(-1, 1, out, device=device)
    gw = theta[:, None, None, None, :, 0] * r[None, None, None, :, None]
    gh = theta[:, None, None, None, :, 1] * r[None, None, :, None, None]
    gd = theta[:, None, None, None, :, 2] * r[None, :, None, None, None]
    return (gw + gh) + gd


def voxel_coords(mat: torch.Tensor, in_size: tuple[int, int, int], out: int) -> torch.Tensor:
    """(n,3,out,out,out) float32 input voxel coordinates (x, y, z) of the ``out``^3 output.

    ``in_a = c_a + sum_b mat[a, b] * o_b`` about the centres ``c`` of input and output,
    from broadcast outer products (no (n, out^3, 3) matmul).
    """
    device = mat.device
    m = mat.float()
    r = torch.arange(out, device=device, dtype=torch.float32) - (out - 1) / 2
    centre = (torch.tensor(in_size, device=device, dtype=torch.float32) - 1) / 2
    cx = centre[None, :, None] + m[:, :, 0, None] * r  # (n, 3, out)
    cy = m[:, :, 1, None] * r
    cz = m[:, :, 2, None] * r
    return (cx[..., :, None, None] + cy[..., None, :, None]) + cz[..., None, None, :]


def center_crop(x: torch.Tensor, out: int) -> torch.Tensor:
    starts = [(s - out) // 2 for s in x.shape[-3:]]
    return x[
        ..., starts[0] : starts[0] + out, starts[1] : starts[1] + out, starts[2] : starts[2] + out
    ]


def warp_image(image: torch.Tensor, mat: torch.Tensor, out: int) -> torch.Tensor:
    """The torch route, any device: the central ``out``^3 of (n,1,*S) float images warped
    through ``mat``, trilinear with border padding (one 3-D ``grid_sample``)."""
    grid = sampling_grid(mat, tuple(image.shape[-3:]), out)
    return F.grid_sample(
        image, grid.to(image.dtype), mode="bilinear", padding_mode="border", align_corners=True
    )


def warp_reference(
    image: torch.Tensor, bits: torch.Tensor, mat: torch.Tensor, out: int, n_bits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``warp`` by the torch routes (``warp_image``, ``mask_bits.nearest_bits``), any device."""
    coords = voxel_coords(mat, tuple(bits.shape[-3:]), out)
    return warp_image(image.float(), mat, out), nearest_bits(bits, coords, n_bits)


def warp(
    image: torch.Tensor, bits: torch.Tensor, mat: torch.Tensor, out: int, n_bits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The central ``out``^3 of image (n,1,*S) float and bit fields (n,1,*S) int through ``mat``.

    The image is sampled trilinearly (border padding), the bits at the rounded point of the
    same coordinates (exact nearest neighbour, zeros outside). With ``n_bits`` <= 16 the
    warped fields are int16 (same bits), else int32. On the CPU one compiled pass per sample
    (``train.kernels.warp``, ~5x cheaper than the torch route); elsewhere ``warp_reference``.
    """
    if image.device.type != "cpu":
        return warp_reference(image, bits, mat, out, n_bits)
    if image.dtype not in (torch.float32, torch.float16) or (
        image.dtype == torch.float16 and bits.dtype != torch.int16
    ):
        image = image.float()  # a float16 image is read as it is beside compact (int16) bits
    if bits.dtype not in (torch.int16, torch.int32):
        bits = bits.to(torch.int32)
    n = image.shape[0]
    dtype = torch.int16 if n_bits is not None and n_bits <= 16 else torch.int32
    res_img = torch.empty((n, 1, out, out, out), dtype=torch.float32)
    res_bits = torch.empty((n, 1, out, out, out), dtype=dtype)
    for i in range(n):
        warp_volume(
            image[i, 0].contiguous(), bits[i, 0].contiguous(), mat[i], res_img[i, 0], res_bits[i, 0]
        )
    return res_img, res_bits
