"""Bit fields -> one byte per bit and voxel, compiled for the CPU."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit


@njit(cache=True, nogil=True)
def _unpack(field, out):  # pragma: no cover - compiled
    """``out[j, v] = bit j of field[v]``, blocked over v so a block of the field stays in L1."""
    k, n = out.shape
    for v0 in range(0, n, 4096):
        v1 = min(v0 + 4096, n)
        f = field[v0:v1]
        for j in range(k):
            o = out[j, v0:v1]
            sh = np.int32(j)
            for v in range(v1 - v0):
                o[v] = np.uint8((np.int32(f[v]) >> sh) & 1)


def unpack_into(field: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` (k, *S) bool = bits 0..k-1 of ``field`` (*S) int16/int32; both contiguous CPU."""
    if field.dtype not in (torch.int16, torch.int32) or out.dtype != torch.bool:
        raise TypeError(
            f"need an int16/int32 field and a bool output, got {field.dtype}, {out.dtype}"
        )
    if field.device.type != "cpu" or out.device.type != "cpu":
        raise ValueError("CPU tensors only")
    if not (field.is_contiguous() and out.is_contiguous()):
        raise ValueError("field and output must be contiguous")
    k = out.shape[0] if out.dim() else 0
    if out.dim() == 0 or tuple(out.shape[1:]) != tuple(field.shape):
        raise ValueError(f"output {tuple(out.shape)} is not (k, *{tuple(field.shape)})")
    if k > 8 * field.element_size():
        raise ValueError(f"cannot unpack {k} bits of a {field.dtype} field")
    _unpack(field.numpy().reshape(-1), out.numpy().view(np.uint8).reshape(k, -1))
