"""Fused affine warp of one volume on the CPU: image trilinear, bit field nearest, one pass.

Why: ATen's 3-D ``grid_sample`` is scalar on the CPU (~45 ns per output voxel), and the
bits need a second gather through the same coordinates. This loop computes each output
row's input points once (a branch-free loop that vectorises), then samples the image
trilinearly (8 neighbours, border clamp: what the GPU's 3-D ``grid_sample`` computes) and
takes the bit field at the rounded point (0 outside the input) in one pass over the output.
A float16 image is read as it is (half the bytes of the input crop; exact conversion).
The rotated reads miss the caches: the sampling loop prefetches the lines of the points a
few voxels ahead (their addresses are known from the row's first loop), a few per cent.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload


@intrinsic
def _half_to_float(typingctx, bits):
    """IEEE half (its uint16 bits) -> float32, exact: LLVM's ``fpext`` (F16C on x86)."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _prefetch(typingctx, a, i):
    """Hint that element ``i`` of the 1-D array ``a`` is read soon (``llvm.prefetch``: for
    reading, keep in all cache levels). Only a hint: an address outside ``a`` is harmless."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(a, types.intp), codegen


def _load(a, i):
    """Element ``i`` of an image as float32 (stub: the compiled versions are overloads)."""
    raise NotImplementedError


@overload(_load, inline="always")
def _load_typed(a, i):
    if a.dtype == types.uint16:  # IEEE half bits (numba has no float16 arithmetic)

        def half(a, i):
            return _half_to_float(a[i])

        return half
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    return None


_AHEAD = 16  # prefetch distance (output voxels)


@njit(cache=True, nogil=True)
def _warp(img, bits, shape, m, out, out_img, out_bits):  # pragma: no cover - compiled
    """Per output row: the input points of its voxels (corner offsets, weights, bit index;
    a branch-free loop that vectorises), then a loop of the loads."""
    X, Y, Z = shape
    h = (out - 1) / 2.0
    cx, cy, cz = (X - 1) / 2.0, (Y - 1) / 2.0, (Z - 1) / 2.0
    sx, sy = np.int32(Y * Z), np.int32(Z)
    iX, iY, iZ = np.int32(X), np.int32(Y), np.int32(Z)
    fX, fY, fZ = np.float32(X - 1), np.float32(Y - 1), np.float32(Z - 1)
    zero, half = np.float32(0.0), np.float32(0.5)
    m2, m5, m8 = np.float32(m[2]), np.float32(m[5]), np.float32(m[8])
    base = np.empty(out, np.int32)
    dxa, dya, dza, bi = (
        np.empty(out, np.int32),
        np.empty(out, np.int32),
        np.empty(out, np.int32),
        np.empty(out, np.int32),
    )
    fxa, fya, fza = np.empty(out, np.float32), np.empty(out, np.float32), np.empty(out, np.float32)
    ow = np.empty(out, np.float32)
    for w in range(out):
        ow[w] = np.float32(w - h)
    for u in range(out):
        ou = u - h
        for v in range(out):
            ov = v - h
            bx = np.float32(cx + m[0] * ou + m[1] * ov)
            by = np.float32(cy + m[3] * ou + m[4] * ov)
            bz = np.float32(cz + m[6] * ou + m[7] * ov)
            for w in range(out):
                px, py, pz = bx + m2 * ow[w], by + m5 * ow[w], bz + m8 * ow[w]
                rx = np.int32(np.floor(px + half))
                ry = np.int32(np.floor(py + half))
                rz = np.int32(np.floor(pz + half))
                inside = (rx >= 0) & (rx < iX) & (ry >= 0) & (ry < iY) & (rz >= 0) & (rz < iZ)
                bi[w] = rx * sx + ry * sy + rz if inside else np.int32(-1)
                qx = min(max(px, zero), fX)
                qy = min(max(py, zero), fY)
                qz = min(max(pz, zero), fZ)
                lx, ly, lz = np.floor(qx), np.floor(qy), np.floor(qz)
                x0, y0, z0 = np.int32(lx), np.int32(ly), np.int32(lz)
                fxa[w], fya[w], fza[w] = qx - lx, qy - ly, qz - lz
                dxa[w] = sx if x0 < iX - 1 else np.int32(0)
                dya[w] = sy if y0 < iY - 1 else np.int32(0)
                dza[w] = np.int32(1) if z0 < iZ - 1 else np.int32(0)
                base[w] = x0 * sx + y0 * sy + z0
            o = (u * out + v) * out
            for w in range(out):
                if w + _AHEAD < out:  # the row's addresses are known: fetch those ahead
                    q = base[w + _AHEAD]
                    qx, qy = dxa[w + _AHEAD], dya[w + _AHEAD]
                    _prefetch(img, q)
                    _prefetch(img, q + qy)
                    _prefetch(img, q + qx)
                    _prefetch(img, q + qx + qy)
                    if bi[w + _AHEAD] >= 0:
                        _prefetch(bits, bi[w + _AHEAD])
                p = np.uint32(base[w])
                dx, dy, dz = np.uint32(dxa[w]), np.uint32(dya[w]), np.uint32(dza[w])
                fx, fy, fz = fxa[w], fya[w], fza[w]
                a0, a1 = _load(img, p), _load(img, p + dz)
                a2, a3 = _load(img, p + dy), _load(img, p + dy + dz)
                a4, a5 = _load(img, p + dx), _load(img, p + dx + dz)
                a6, a7 = _load(img, p + dx + dy), _load(img, p + dx + dy + dz)
                c00, c01 = a0 + fz * (a1 - a0), a2 + fz * (a3 - a2)
                c10, c11 = a4 + fz * (a5 - a4), a6 + fz * (a7 - a6)
                c0, c1 = c00 + fy * (c01 - c00), c10 + fy * (c11 - c10)
                out_img[o + w] = c0 + fx * (c1 - c0)
                j = bi[w]
                out_bits[o + w] = bits[np.uint32(j)] if j >= 0 else 0


_IMAGE_TYPES = (torch.float32, torch.float16)
_BIT_TYPES = (torch.int16, torch.int32)


def warp_volume(
    image: torch.Tensor,
    bits: torch.Tensor,
    mat: torch.Tensor,
    out_image: torch.Tensor,
    out_bits: torch.Tensor,
) -> None:
    """Fill ``out_image`` (out^3 float32, trilinear) and ``out_bits`` (out^3 int16/int32,
    nearest) from one (X,Y,Z) ``image`` (float32/float16) and ``bits`` (int16/int32).

    ``mat`` (3,3) maps output voxel offsets from the output's centre to input offsets from the
    input's centre. All tensors contiguous on the CPU. int16 bits into int32 output are
    sign-extended, int32 into int16 keep their low 16 bits (torch's casts).
    """
    tensors = {"image": image, "bits": bits, "out_image": out_image, "out_bits": out_bits}
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous() or t.dim() != 3:
            raise ValueError(f"{name} must be a contiguous 3-D CPU tensor, got {tuple(t.shape)}")
    if image.dtype not in _IMAGE_TYPES or out_image.dtype != torch.float32:
        raise TypeError(f"image float32/float16 -> float32, got {image.dtype} -> {out_image.dtype}")
    if bits.dtype not in _BIT_TYPES or out_bits.dtype not in _BIT_TYPES:
        raise TypeError(f"bits int16/int32 -> int16/int32, got {bits.dtype} -> {out_bits.dtype}")
    if bits.shape != image.shape:
        raise ValueError(f"bits {tuple(bits.shape)} differ from image {tuple(image.shape)}")
    out = out_image.shape[0]
    if tuple(out_image.shape) != (out,) * 3 or out_bits.shape != out_image.shape:
        raise ValueError(f"outputs must be two equal cubes, got {tuple(out_image.shape)}")
    if image.numel() >= 2**31:  # int32 voxel offsets
        raise ValueError(f"volume {tuple(image.shape)} too large for the compiled warp")
    m = torch.as_tensor(mat, dtype=torch.float64).reshape(-1)
    if m.numel() != 9:
        raise ValueError(f"mat must be 3x3, got {tuple(torch.as_tensor(mat).shape)}")
    img = (
        image.view(torch.int16).numpy().view(np.uint16)
        if image.dtype == torch.float16
        else image.numpy()
    )
    _warp(
        img.reshape(-1),
        bits.numpy().reshape(-1),
        tuple(image.shape),
        m.numpy(),
        out,
        out_image.numpy().reshape(-1),
        out_bits.numpy().reshape(-1),
    )
