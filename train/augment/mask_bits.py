"""Masks as bit fields: K binary masks travel as the bits of one integer channel.

A warp then gathers one channel instead of K (exact for binary masks, no float
conversion), and the masks are unpacked once, at the end.
"""

from __future__ import annotations

import torch

from maskbank.train.kernels.bits import unpack_into

MAX_TASKS = 24  # bits of an int32 field that the float32 coordinates of a gather keep exact


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """(n,K,*S) bool -> (n,1,*S) int32 with bit k set where mask k is (K <= 24)."""
    if masks.shape[1] > MAX_TASKS:
        raise ValueError(f"at most {MAX_TASKS} tasks per sample, got {masks.shape[1]}")
    acc = torch.zeros((masks.shape[0], 1, *masks.shape[2:]), dtype=torch.int32, device=masks.device)
    for k in range(masks.shape[1]):
        acc |= masks[:, k : k + 1].to(torch.int32) << k
    return acc


def unpack_bits_reference(bits: torch.Tensor, k: int) -> torch.Tensor:
    """The torch route, any device: (n,1,*S) integer bit fields -> (n,K,*S) bool."""
    shifts = torch.arange(k, device=bits.device, dtype=torch.int32).view(1, -1, 1, 1, 1)
    return ((bits.to(torch.int32) >> shifts) & 1).bool()


def unpack_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """(n,1,*S) integer bit fields -> (n,K,*S) bool; on the CPU through the compiled loop
    (``train.kernels.bits``, ~70x cheaper than the shifts of ``unpack_bits_reference``)."""
    if bits.device.type != "cpu" or bits.dtype not in (torch.int16, torch.int32):
        return unpack_bits_reference(bits, k)
    out = torch.empty((bits.shape[0], k, *bits.shape[2:]), dtype=torch.bool)
    for i in range(bits.shape[0]):
        unpack_into(bits[i, 0].contiguous(), out[i])
    return out


def nearest_bits(
    bits: torch.Tensor, coords: torch.Tensor, n_bits: int | None = None
) -> torch.Tensor:
    """The torch route of the nearest-neighbour warp of bit fields, any device.

    ``bits`` (n,1,X,Y,Z) integer, ``coords`` (n,3,*O) float input voxel coordinates
    (``spatial.voxel_coords``). Each output voxel takes the field at ``floor(c + 0.5)``,
    0 outside the input. int16 out when ``n_bits`` <= 16 says the bits fit, else int32.
    """
    n, size = bits.shape[0], bits.shape[-3:]
    dtype = torch.int16 if n_bits is not None and n_bits <= 16 else torch.int32
    idx = (coords + 0.5).floor_().long()
    hi = torch.tensor(size, device=bits.device).view(1, 3, *([1] * (coords.dim() - 2)))
    inside = ((idx >= 0) & (idx < hi)).all(1)
    idx = torch.minimum(idx.clamp_(min=0), hi - 1)
    flat = (idx[:, 0] * size[1] + idx[:, 1]) * size[2] + idx[:, 2]
    field = bits.reshape(n, -1).to(dtype)  # int32 -> int16 keeps the low 16 bits
    taken = torch.gather(field, 1, flat.reshape(n, -1)).view(n, 1, *coords.shape[2:])
    return taken.where(inside[:, None], torch.zeros((), dtype=dtype, device=bits.device))
