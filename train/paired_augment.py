"""Paired, batched augmentation of reference/query crops (GPU when present, CPU otherwise).

The sampler hands over crops of ``crop + 2 * margin`` voxels; augmentation warps
them with one random affine per sample and cuts the central ``crop``^3, so the
warp pulls real context from the margin instead of zero padding. Image and masks
go through the same voxel coordinates (linear for the image, nearest neighbour
for the bit-packed masks) so they stay aligned voxel for voxel. On the GPU the
image is sampled trilinearly (one 3-D ``grid_sample``). On the CPU one compiled
loop (``train.cpu_kernels``, built on first use) samples the image trilinearly
(the same values as the GPU, up to float rounding) and gathers the bits at the
rounded point of the same coordinates in one pass, ~2x cheaper than the torch
route it replaces when no C compiler is available: two vectorised 2-D bilinear
passes (``_two_pass_linear``), which weight the same 8 neighbours around the
same point and agree with trilinear up to interpolation error, plus a separate
nearest gather (``_nearest_bits``).

Defaults (the published MASS/Iris recipe):

=====================  ===================  ====================
                       reference (weak)     query (strong)
=====================  ===================  ====================
affine probability     0.5                  0.8
scale per axis         0.7 .. 1/0.7         0.7 .. 1/0.7
rotation per axis      +-30 deg             +-30 deg
shear                  none                 +-0.2
brightness (x)         p 0.2, 0.75..1.25    p 0.2, 0.75..1.25
additive shift         --                   p 0.2, +-0.1 std
gamma                  p 0.2, 0.7..1.5      p 0.2, 0.7..1.5
contrast               p 0.2, 0.75..1.25    p 0.2, 0.75..1.25
Gaussian blur          --                   p 0.2, sigma 0.5..1.0
Gaussian noise         --                   p 0.2, std 0..0.1
=====================  ===================  ====================

All randomness comes from an explicit ``torch.Generator`` so that a resumed run
re-creates exactly the augmentations of an uninterrupted one.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from train import cpu_kernels


@dataclass(frozen=True)
class AugmentSpec:
    p_affine: float = 0.8
    scale: tuple[float, float] = (0.7, 1 / 0.7)
    rotation_deg: float = 30.0
    shear: float = 0.2
    p_brightness: float = 0.2
    brightness: tuple[float, float] = (0.75, 1.25)
    p_shift: float = 0.2
    shift: float = 0.1
    p_gamma: float = 0.2
    gamma: tuple[float, float] = (0.7, 1.5)
    p_contrast: float = 0.2
    contrast: tuple[float, float] = (0.75, 1.25)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_noise: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.1)


STRONG = AugmentSpec()
WEAK = replace(STRONG, p_affine=0.5, shear=0.0, p_shift=0.0, p_blur=0.0, p_noise=0.0)
NONE = replace(
    STRONG,
    p_affine=0.0,
    p_brightness=0.0,
    p_shift=0.0,
    p_gamma=0.0,
    p_contrast=0.0,
    p_blur=0.0,
    p_noise=0.0,
)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _bernoulli(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


def random_affine(n: int, spec: AugmentSpec, gen: torch.Generator, device) -> torch.Tensor:
    """(n,3,3) matrices mapping output offsets to input offsets (voxels, about the centre)."""
    eye = torch.eye(3, device=device).expand(n, 3, 3).clone()
    if spec.p_affine <= 0:
        return eye
    apply = _bernoulli(n, spec.p_affine, gen, device)
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
    # Same as F.affine_grid(theta, align_corners=True) (no translation), but built from
    # three broadcast outer products: several times cheaper on the CPU.
    r = torch.linspace(-1, 1, out, device=device)
    gw = theta[:, None, None, None, :, 0] * r[None, None, None, :, None]
    gh = theta[:, None, None, None, :, 1] * r[None, None, :, None, None]
    gd = theta[:, None, None, None, :, 2] * r[None, :, None, None, None]
    return (gw + gh) + gd


def _blur_matrix(n: int, sigma: float, radius: int, device, dtype) -> torch.Tensor:
    """(n, n) band matrix of a normalised Gaussian with replicate borders: out = M @ x."""
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kern = torch.exp(-(t**2) / (2 * float(sigma) ** 2))
    kern = kern / kern.sum()
    rows = torch.arange(n, device=device)[:, None].expand(n, 2 * radius + 1)
    cols = (rows + torch.arange(-radius, radius + 1, device=device)).clamp(0, n - 1)
    mat = torch.zeros((n, n), device=device, dtype=dtype)
    return mat.index_put_((rows, cols), kern.expand(n, -1).contiguous(), accumulate=True)


def _blur_axis(x: torch.Tensor, mat: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """``mat`` (band of half-width ``radius``) applied along ``axis`` of a 3-D volume.

    Row blocks of the band times the matching slab of ``x``: dense matmuls (BLAS)
    over ~block + 2 * radius columns instead of all n (the zeros of the band).
    """
    n = x.shape[axis]
    nb = max(1, min(8, n // 16))
    step = -(-n // nb)
    outs = []
    for b0 in range(0, n, step):
        b1 = min(b0 + step, n)
        lo, hi = max(b0 - radius, 0), min(b1 + radius, n)
        sub = mat[b0:b1, lo:hi]
        if axis == 0:
            outs.append(sub @ x[lo:hi].reshape(hi - lo, -1))
        elif axis == 1:
            outs.append(torch.matmul(sub, x[:, lo:hi]))
        else:
            outs.append(x[:, :, lo:hi].reshape(-1, hi - lo) @ sub.T)
    if axis == 0:
        return torch.cat(outs, 0).view(x.shape)
    if axis == 1:
        return torch.cat(outs, 1)
    return torch.cat(outs, 1).view(x.shape)


def _gaussian_blur(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable blur with a per-sample sigma (replicate borders); img (n,1,X,Y,Z).

    Each axis is a symmetric 7-tap sum of shifted views (4 products, 6 adds per
    voxel), for the whole batch at once without host syncs: the GPU path.
    """
    radius = 3
    t = torch.arange(-radius, radius + 1, device=img.device, dtype=img.dtype)
    kern = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(img.dtype) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (n, 2r+1)
    w = kern.view(img.shape[0], 1, 1, 1, 1, -1)
    x = img
    for dim in (2, 3, 4):
        size = x.shape[dim]
        idx = torch.arange(-radius, size + radius, device=img.device).clamp(0, size - 1)
        xp = x.index_select(dim, idx)  # replicate padding along dim
        acc = xp.narrow(dim, radius, size) * w[..., radius]
        for r in range(1, radius + 1):
            pair = xp.narrow(dim, radius - r, size) + xp.narrow(dim, radius + r, size)
            acc.add_(pair.mul_(w[..., radius + r]))
        x = acc
    return x


def _gaussian_blur_mm(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``_gaussian_blur`` as banded matrix products, one sample at a time: the CPU path.

    Each axis is cut into row blocks of the band so that BLAS runs over
    ~block + 6 columns: ~2x cheaper on the CPU than the shifted views (which
    are ~3x cheaper than a grouped ``conv3d``).
    """
    radius = 3
    out = torch.empty_like(img)
    for i in range(img.shape[0]):
        x = img[i, 0]
        for axis in range(3):
            mat = _blur_matrix(x.shape[axis], float(sigma[i]), radius, img.device, img.dtype)
            x = _blur_axis(x, mat, axis, radius)
        out[i, 0] = x
    return out


def _gaussian_blur_c(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``_gaussian_blur_mm`` through the compiled 7-tap loop per axis (``train.cpu_kernels``)."""
    radius = 3
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    out = torch.empty_like(img)
    shape = tuple(img.shape[-3:])
    a = _scratch("blur_a", shape, torch.float32, "cpu")
    b = _scratch("blur_b", shape, torch.float32, "cpu")
    for i in range(img.shape[0]):
        kern = torch.exp(-(t**2) / (2 * float(sigma[i]) ** 2))
        kern = (kern / kern.sum()).numpy()
        cpu_kernels.filter_axis(img[i, 0].contiguous(), a, 0, kern)
        cpu_kernels.filter_axis(a, b, 1, kern)
        cpu_kernels.filter_axis(b, out[i, 0], 2, kern)
    return out


def _intensity_cpu(
    img: torch.Tensor, spec: AugmentSpec, gen: torch.Generator, owned: bool = False
) -> torch.Tensor:
    """CPU ``intensity_augment``: same draws, same formulas, applied in place to drawn samples.

    The first operation that applies copies the input once (unless ``owned``:
    the caller hands it over); after that every
    operation works in place on the samples that drew it (no whole-batch
    ``where`` or temporaries), gamma as ``exp(g * log(x))`` (~2x ``pow``).
    """
    n, device = img.shape[0], img.device

    def drawn(p: float) -> list[int]:
        return _bernoulli(n, p, gen, device).nonzero().flatten().tolist()

    def take() -> torch.Tensor:
        nonlocal img, owned
        if not owned:
            img, owned = img.clone(), True
        return img

    if spec.p_brightness > 0:
        idx = drawn(spec.p_brightness)
        f = _uniform(n, *spec.brightness, gen, device).tolist()
        for i in idx:
            take()[i].mul_(f[i])
    if spec.p_shift > 0:
        idx = drawn(spec.p_shift)
        u = _uniform(n, -spec.shift, spec.shift, gen, device).tolist()
        for i in idx:
            x = take()[i]
            x.add_(u[i] * float(x.std()))
    if spec.p_gamma > 0:
        idx = drawn(spec.p_gamma)
        g = _uniform(n, *spec.gamma, gen, device).tolist()
        for i in idx:
            x = take()[i]
            lo, hi = (float(v) for v in torch.aminmax(x))
            rng = max(hi - lo, 1e-6)
            # ((x - lo) / rng) ** g * rng + lo. The base is floored at 1e-20 (its power,
            # <= 1e-14, vanishes against rng in float32): log of 0 or of denormals takes a
            # slow path (~4x), and padded crops have many voxels at lo.
            x.sub_(lo).div_(rng).clamp_min_(1e-20).log_().mul_(g[i]).exp_().mul_(rng).add_(lo)
    if spec.p_contrast > 0:
        idx = drawn(spec.p_contrast)
        f = _uniform(n, *spec.contrast, gen, device).tolist()
        for i in idx:
            x = take()[i]
            mean = float(x.mean())
            x.sub_(mean).mul_(f[i]).add_(mean)
    if spec.p_blur > 0:
        idx = drawn(spec.p_blur)
        sig = _uniform(n, *spec.blur_sigma, gen, device)
        for i in idx:
            x = img[i : i + 1]
            fast = x.dtype == torch.float32 and cpu_kernels.kernels() is not None
            take()[i : i + 1] = (_gaussian_blur_c if fast else _gaussian_blur_mm)(x, sig[i : i + 1])
    if spec.p_noise > 0:
        idx = drawn(spec.p_noise)
        std = _uniform(n, *spec.noise_std, gen, device).tolist()
        for i in idx:
            noise = torch.randn(img.shape[1:], generator=gen, device=device, dtype=img.dtype)
            take()[i].add_(noise, alpha=std[i])
    return img


def intensity_augment(
    img: torch.Tensor, spec: AugmentSpec, gen: torch.Generator, inplace: bool = False
) -> torch.Tensor:
    """Per-sample brightness, shift, gamma, contrast, blur, noise; img (n,1,X,Y,Z).

    On the CPU (``_intensity_cpu``) an operation no sample drew is skipped and the
    others run in place on the samples that drew them; on the GPU each is computed
    for the whole batch and masked out, which avoids a host sync per operation.
    The input is not modified unless ``inplace`` (the CPU path then works in it directly).
    """
    if img.device.type == "cpu":
        return _intensity_cpu(img, spec, gen, owned=inplace)
    return _intensity_batched(img, spec, gen)


def _intensity_batched(img: torch.Tensor, spec: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """GPU ``intensity_augment``: every operation on the whole batch, masked per sample."""
    n, device = img.shape[0], img.device
    view = (n, 1, 1, 1, 1)
    dims = (1, 2, 3, 4)
    if spec.p_brightness > 0:
        m = _bernoulli(n, spec.p_brightness, gen, device)
        f = _uniform(n, *spec.brightness, gen, device)
        img = img * torch.where(m, f, torch.ones_like(f)).view(view)
    if spec.p_shift > 0:
        m = _bernoulli(n, spec.p_shift, gen, device)
        u = _uniform(n, -spec.shift, spec.shift, gen, device)
        sh = u * img.std(dim=dims)
        img = img + torch.where(m, sh, torch.zeros_like(sh)).view(view)
    if spec.p_gamma > 0:
        m = _bernoulli(n, spec.p_gamma, gen, device)
        g = _uniform(n, *spec.gamma, gen, device)
        lo = img.amin(dim=dims, keepdim=True)
        hi = img.amax(dim=dims, keepdim=True)
        rng = (hi - lo).clamp_min(1e-6)
        gam = ((img - lo) / rng).clamp_min(0) ** g.view(view) * rng + lo
        img = torch.where(m.view(view), gam, img)
    if spec.p_contrast > 0:
        m = _bernoulli(n, spec.p_contrast, gen, device)
        f = _uniform(n, *spec.contrast, gen, device)
        mean = img.mean(dim=dims, keepdim=True)
        img = torch.where(m.view(view), (img - mean) * f.view(view) + mean, img)
    if spec.p_blur > 0:
        m = _bernoulli(n, spec.p_blur, gen, device)
        sig = _uniform(n, *spec.blur_sigma, gen, device)
        img = torch.where(m.view(view), _gaussian_blur(img, sig), img)
    if spec.p_noise > 0:
        m = _bernoulli(n, spec.p_noise, gen, device)
        std = _uniform(n, *spec.noise_std, gen, device)
        noise = torch.randn(img.shape, generator=gen, device=device, dtype=img.dtype)
        img = img + noise * (std * m).view(view)
    return img


MAX_TASKS = 24  # bit fields travel as float32 through grid_sample: exact up to 2**24


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """(n,K,*S) bool -> (n,1,*S) int32 with bit k set where mask k is (K <= 24)."""
    if masks.shape[1] > MAX_TASKS:
        raise ValueError(f"at most {MAX_TASKS} tasks per sample, got {masks.shape[1]}")
    acc = torch.zeros((masks.shape[0], 1, *masks.shape[2:]), dtype=torch.int32, device=masks.device)
    for k in range(masks.shape[1]):
        acc |= masks[:, k : k + 1].to(torch.int32) << k
    return acc


def unpack_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """(n,1,*S) integer bit fields -> (n,K,*S) bool."""
    size = bits.element_size()
    if (
        bits.device.type == "cpu"
        and bits.dtype in (torch.int16, torch.int32)
        and k <= 8 * size
        and cpu_kernels.kernels() is not None
    ):
        n = bits.shape[0]
        out = torch.empty((n, k, *bits.shape[2:]), dtype=torch.bool)
        for i in range(n):
            # <= 16 bits: an int16 field (same low bits; a copy of a strided crop anyway)
            # takes the streaming-store loop.
            field = bits[i].to(torch.int16) if k <= 16 else bits[i]
            cpu_kernels.unpack(field.contiguous(), k, out[i])
        return out
    if bits.device.type == "cpu" and k <= 8 * size and size in (2, 4):
        # Shift + AND on the uint8 byte planes of the little-endian int32 (or int16) field,
        # written straight into the bool output: ~5x faster than uint16 masks, ~25x than
        # torch shifts.
        n = bits.shape[0]
        field = np.ascontiguousarray(bits.numpy(), dtype=f"<i{size}").reshape(n, -1)
        raw = field.view(np.uint8)  # (n, size * voxels), byte b of voxel v at size * v + b
        planes = [np.ascontiguousarray(raw[:, b::size]) for b in range((k + 7) // 8)]
        out = np.empty((n, k, field.shape[1]), dtype=np.uint8)
        if field.shape[1] % 8 == 0:
            # Eight voxels per uint64 word: bit j of every byte moved to bit 0 and masked
            # (a right shift by j < 8 brings only higher bits into the rest of each byte).
            planes = [p.view(np.uint64) for p in planes]
            words = out.view(np.uint64)
            for j in range(k):
                np.right_shift(planes[j // 8], np.uint64(j % 8), out=words[:, j])
                np.bitwise_and(words[:, j], np.uint64(0x0101010101010101), out=words[:, j])
        else:
            for j in range(k):
                np.right_shift(planes[j // 8], j % 8, out=out[:, j])
                np.bitwise_and(out[:, j], 1, out=out[:, j])
        return torch.from_numpy(out.view(bool)).view(n, k, *bits.shape[2:])
    shifts = torch.arange(k, device=bits.device, dtype=torch.int32).view(1, -1, 1, 1, 1)
    return ((bits.to(torch.int32) >> shifts) & 1).bool()


def voxel_coords(
    mat: torch.Tensor, in_size: tuple[int, int, int], out: int, offset: float = 0.0
) -> torch.Tensor:
    """(n,3,out,out,out) float32 input voxel coordinates (x, y, z) of the ``out``^3 output.

    ``in_a = c_a + offset + sum_b mat[a, b] * o_b`` about the centres ``c`` of
    input and output; built from broadcast outer products (no (n, out^3, 3) matmul).
    """
    device = mat.device
    m = mat.float()
    r = torch.arange(out, device=device, dtype=torch.float32) - (out - 1) / 2
    centre = (torch.tensor(in_size, device=device, dtype=torch.float32) - 1) / 2 + offset
    cx = centre[None, :, None] + m[:, :, 0, None] * r  # (n, 3, out)
    cy = m[:, :, 1, None] * r
    cz = m[:, :, 2, None] * r
    return (cx[..., :, None, None] + cy[..., None, :, None]) + cz[..., None, None, :]


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised buffer for a temporary, reused across calls (per thread) on the CPU.

    Why: warp temporaries (grids, padded fields, coordinates) are tens of MB per
    call; fresh ones cost page faults and kernel zeroing (~15% of the CPU path).
    Each ``name`` is one buffer: never return it or use one name twice at once.
    On the GPU the caching allocator already reuses memory: plain ``torch.empty``.
    """
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    numel = math.prod(shape)
    buf = pool.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = pool[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def _nearest_bits(
    bits: torch.Tensor, mat: torch.Tensor, out: int, n_bits: int | None = None
) -> torch.Tensor:
    """Nearest-neighbour gather of (n,1,*S) int bit fields through ``mat``; 0 outside.

    Returns int32 fields, or int16 ones when ``n_bits`` <= 16 says the bits fit
    (half the bytes to pad and gather: ~30% cheaper).

    The field is padded by one zero voxel per side and indices are clamped into
    that border, so no validity mask is needed. Per axis the rounded coordinate
    ``floor(c + 1.5 + mat @ o)`` (the pad, plus 0.5 so that floor rounds) is one
    broadcast add of a (out, out, 1) plane and an (out,) row, then floored and
    clamped in place; the flat index is exact in float32 while the padded volume
    has < 2**24 voxels (int64 otherwise) and is gathered with int32 indices.
    """
    n = bits.shape[0]
    size = tuple(bits.shape[-3:])
    device = bits.device
    dtype = torch.int16 if n_bits is not None and n_bits <= 16 else torch.int32
    # Zero border of one voxel: (n, X+2, Y+2, Z+2): the six faces zeroed, the interior copied.
    padded = _scratch("pad", (n, size[0] + 2, size[1] + 2, size[2] + 2), dtype, device)
    for dim in (1, 2, 3):
        padded.narrow(dim, 0, 1).zero_()
        padded.narrow(dim, padded.shape[dim] - 1, 1).zero_()
    padded[:, 1:-1, 1:-1, 1:-1] = bits[:, 0]  # int16: a same-bits cast (two's complement)
    strides = ((size[1] + 2) * (size[2] + 2), size[2] + 2, 1)
    exact = padded[0].numel() < 2**24
    m = mat.float()
    r = torch.arange(out, device=device, dtype=torch.float32) - (out - 1) / 2
    res = torch.empty((n, 1, out, out, out), dtype=dtype, device=device)
    coord = _scratch("coord", (out, out, out), torch.float32, device)
    flat = _scratch("flat", (out, out, out), torch.float32, device)
    for i in range(n):
        wide = None  # int64 flat index when float32 is not exact
        for a in range(3):
            c = (size[a] - 1) / 2 + 1.5
            plane = (c + m[i, a, 0] * r)[:, None] + (m[i, a, 1] * r)[None, :]
            acc = flat if a == 0 else coord
            torch.add(plane[:, :, None], m[i, a, 2] * r, out=acc)
            acc.floor_().clamp_(0, size[a] + 1)
            if not exact:
                part = acc.long().mul_(strides[a])
                wide = part if wide is None else wide.add_(part)
            elif a > 0:
                flat.add_(coord.mul_(strides[a]) if strides[a] != 1 else coord)
            else:
                flat.mul_(strides[a])
        if exact:
            idx = _scratch("idx", (out**3,), torch.int32, device).copy_(flat.view(-1))
        else:
            idx = wide.view(-1)
        torch.index_select(padded[i].view(-1), 0, idx, out=res[i].view(-1))
    return res


def _warp_image_3d(image: torch.Tensor, mat: torch.Tensor, out: int) -> torch.Tensor:
    """Trilinear warp with one 3-D ``grid_sample`` (border padding): the GPU path."""
    grid = sampling_grid(mat, tuple(image.shape[-3:]), out)
    return F.grid_sample(
        image, grid.to(image.dtype), mode="bilinear", padding_mode="border", align_corners=True
    )


TWO_PASS_MIN_DET = 0.05  # |det| of mat[1:, 1:] below this: exact 3-D path (never drawn by default)


def _two_pass_linear(vol: torch.Tensor, m: list[list[float]], out: int) -> torch.Tensor:
    """Affine warp of one (X,Y,Z) float volume as two batched 2-D bilinear ``grid_sample``s.

    ATen's 3-D CPU ``grid_sample`` is scalar (~45 ns/voxel); its 2-D kernel is
    vectorised (~8-12 ns/voxel). With ``p = c + m @ o`` (input voxel ``p`` of
    output offset ``o = (u, v, w)``) and ``B = m[1:, 1:]`` invertible, output
    slice ``u`` crosses the input column at integer ``(y, z) = (j, k)`` at
    ``x = g(j, k, u)``, affine in (j, k, u). Pass 1 resamples along x only: for
    each input y-row ``j`` a 2-D warp of the (x, z) plane gives
    ``J[u, j, k] = I(g(j, k, u), j, k)`` (z on the grid). Pass 2 is, for each
    output slice ``u``, a bilinear warp of the (y, z) plane ``J[u]`` at
    ``(p_y, p_z)``. Bilinear weights reproduce affine functions, so the 8 voxels
    used average exactly to ``p``: nearly trilinear (equal up to interpolation
    error, ~h^2 f''). Only the footprint of the output in (y, z) is resampled in
    pass 1. Outside the input the border is replicated along the slice plane
    (``grid_sample`` border padding replicates per axis).
    """
    X, Y, Z = vol.shape
    c = [(X - 1) / 2, (Y - 1) / 2, (Z - 1) / 2]
    h = (out - 1) / 2
    det = m[1][1] * m[2][2] - m[1][2] * m[2][1]
    # g(j, k, u) = c_x + beta * u + r0 * (j - c_y) + r1 * (k - c_z),  r = m[0, 1:] @ inv(B)
    r0 = (m[0][1] * m[2][2] - m[0][2] * m[2][1]) / det
    r1 = (m[0][2] * m[1][1] - m[0][1] * m[1][2]) / det
    beta = m[0][0] - r0 * m[1][0] - r1 * m[2][0]
    # Footprint in (y, z): an affine map's extremes over the cube are sum |m[a]| * h.
    lo, hi = [], []
    for a, n_a in ((1, Y), (2, Z)):
        ext = h * sum(abs(v) for v in m[a])
        lo.append(min(max(0, math.floor(c[a] - ext)), n_a - 2))
        hi.append(max(min(n_a, math.floor(c[a] + ext) + 2), lo[-1] + 2))
    (jlo, klo), (jhi, khi) = lo, hi
    ny, nz = jhi - jlo, khi - klo
    device = vol.device
    u = torch.arange(out, device=device, dtype=torch.float32) - h

    # Pass 1: batch over y rows j; plane (x, z) -> (u, k). grid[..., 0] indexes W (= z).
    # Grids are built as two contiguous component planes and handed over as a permuted
    # view (grid_sample takes strided grids): ~3x cheaper than writing interleaved pairs.
    sx = 2 / (X - 1)
    j = torch.arange(jlo, jhi, device=device, dtype=torch.float32) - c[1]
    k = torch.arange(klo, khi, device=device, dtype=torch.float32) - c[2]
    planes = _scratch("grid1", (2, ny, out, nz), torch.float32, device)
    planes[0] = torch.linspace(-1, 1, nz, device=device)
    ju = ((c[0] * sx - 1) + (r0 * sx) * j)[:, None] + ((beta * sx) * u)[None, :]
    torch.add(ju[:, :, None], ((r1 * sx) * k)[None, None, :], out=planes[1])
    grid1 = planes.permute(1, 2, 3, 0)
    src = vol[:, jlo:jhi, klo:khi].transpose(0, 1)[:, None]  # (ny, 1, X, nz)
    inter = F.grid_sample(src, grid1, mode="bilinear", padding_mode="border", align_corners=True)
    swapped = _scratch("inter", (out, ny, nz), torch.float32, device)
    inter = swapped.copy_(inter.view(ny, out, nz).transpose(0, 1))[:, None]  # (u, 1, ny, nz)

    # Pass 2: batch over output slices u; plane (y, z) -> (v, w).
    planes = _scratch("grid2", (2, out, out, out), torch.float32, device)
    for comp, a, first, n_f in ((1, 1, jlo, ny), (0, 2, klo, nz)):
        s = 2 / (n_f - 1)
        base = ((c[a] - first) * s - 1) + (m[a][0] * s) * u
        plane = base[:, None] + ((m[a][1] * s) * u)[None, :]
        torch.add(plane[:, :, None], ((m[a][2] * s) * u)[None, None, :], out=planes[comp])
    grid2 = planes.permute(1, 2, 3, 0)
    res = F.grid_sample(inter, grid2, mode="bilinear", padding_mode="border", align_corners=True)
    return res.view(out, out, out)


def _two_pass_ok(m: list[list[float]], shape) -> bool:
    identity = m == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    det = m[1][1] * m[2][2] - m[1][2] * m[2][1]
    return not identity and abs(det) >= TWO_PASS_MIN_DET and min(shape[-3:]) >= 2


def warp_image(image: torch.Tensor, mat: torch.Tensor, out: int) -> torch.Tensor:
    """The central ``out``^3 of (n,1,*S) float images warped through ``mat`` (linear).

    GPU: one 3-D ``grid_sample`` (trilinear, border). CPU: ``_two_pass_linear``
    per sample (~2x cheaper), an exact centre crop for the identity, and the 3-D
    path for the (never drawn by default) matrices whose ``mat[1:, 1:]`` is
    near-singular.
    """
    if image.device.type != "cpu":
        return _warp_image_3d(image, mat, out)
    if image.shape[0] == 1 and _two_pass_ok(mat[0].double().tolist(), image.shape):
        return _two_pass_linear(image[0, 0].float(), mat[0].double().tolist(), out)[None, None]
    res = torch.empty((image.shape[0], 1, out, out, out), dtype=image.dtype)
    for i, m in enumerate(mat.double().tolist()):
        if m == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]:
            res[i] = center_crop(image[i], out)
        elif _two_pass_ok(m, image.shape):
            res[i, 0] = _two_pass_linear(image[i, 0].float(), m, out)
        else:
            res[i] = _warp_image_3d(image[i : i + 1], mat[i : i + 1], out)[0]
    return res


def warp(
    image: torch.Tensor, bits: torch.Tensor, mat: torch.Tensor, out: int, n_bits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp image (n,1,*S) float and mask bit fields (n,1,*S) int through ``mat``.

    Returns the central ``out``^3 of both. The image is sampled linearly
    (trilinear on the GPU and in the compiled CPU loop, ``_warp_fused``; two
    bilinear passes on the CPU without it, ``warp_image``); the
    K masks travel bit-packed in one int32 channel gathered at the rounded
    coordinates of the same points (exact nearest neighbour, zeros outside):
    exact for binary masks, no float conversion of the field, and ~K times
    cheaper than warping K channels. With ``n_bits`` <= 16 the warped fields are
    int16 (same bits), else int32.
    """
    if out <= 4096 and _fused_ok(image, bits):
        return _warp_fused(image, bits, mat, out, n_bits)
    return warp_image(image.float(), mat, out), _nearest_bits(bits, mat, out, n_bits)


def _fused_ok(image: torch.Tensor, bits: torch.Tensor) -> bool:
    return (
        image.device.type == "cpu"
        and image.dtype in (torch.float32, torch.float16)
        and bits.dtype in (torch.int16, torch.int32)
        and image.shape[-3:] == bits.shape[-3:]
        and math.prod(image.shape[-3:]) < 2**31
        and cpu_kernels.kernels() is not None
    )


def _warp_fused(
    image: torch.Tensor, bits: torch.Tensor, mat: torch.Tensor, out: int, n_bits: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``warp`` on the CPU through the compiled loop (``train.cpu_kernels``), one sample at a time.

    The image is sampled trilinearly (what the GPU's 3-D ``grid_sample`` computes, border
    padding), the bits at the rounded point of the same coordinates, in one pass. A
    float16 image with int16 bits (``PairStream(compact=True)``) is read as it is (the
    same output as from float32/int32 copies, half the bytes per input voxel).
    """
    n = image.shape[0]
    dtype = torch.int16 if n_bits is not None and n_bits <= 16 else torch.int32
    if image.dtype == torch.float16 and bits.dtype != torch.int16:
        image = image.float()
    res_img = torch.empty((n, 1, out, out, out), dtype=torch.float32)
    res_bits = torch.empty((n, 1, out, out, out), dtype=dtype)
    for i, m in enumerate(mat.double().tolist()):
        cpu_kernels.warp_fused(
            image[i, 0].contiguous(),
            bits[i, 0].contiguous(),
            m,
            out,
            res_img[i, 0],
            res_bits[i, 0],
        )
    return res_img, res_bits


def center_crop(x: torch.Tensor, out: int) -> torch.Tensor:
    starts = [(s - out) // 2 for s in x.shape[-3:]]
    return x[
        ..., starts[0] : starts[0] + out, starts[1] : starts[1] + out, starts[2] : starts[2] + out
    ]


class PairAugmenter:
    """Weak augmentation for the reference, strong for the query, batched on one device."""

    def __init__(self, crop: int, weak: AugmentSpec = WEAK, strong: AugmentSpec = STRONG):
        self.crop = crop
        self.weak = weak
        self.strong = strong

    def _one(self, image, bits, spec, gen, n_tasks):
        n = image.shape[0]
        mat = random_affine(n, spec, gen, image.device)
        warped = ~torch.all(mat == torch.eye(3, device=mat.device), dim=(1, 2))
        # out_img is always a fresh tensor here, so intensity ops may work in place on it.
        if bool(warped.all()):
            out_img, out_bits = warp(image, bits, mat, self.crop, n_tasks)
            return intensity_augment(out_img, spec, gen, inplace=True), out_bits
        out_img = center_crop(image, self.crop).to(torch.float32, copy=True)
        out_bits = center_crop(bits, self.crop)  # a view: only unpacked
        if bits.dtype != torch.int16 or bool(warped.any()):
            out_bits = out_bits.to(torch.int32)  # int16 (<= 16 bits): kept, the same low bits
        if bool(warped.any()):  # only samples that drew an affine pay for the warp
            idx = warped.nonzero().flatten()
            out_bits = out_bits.clone()
            # int32 fields here (n_bits None): they go into the int32 crops.
            out_img[idx], out_bits[idx] = warp(image[idx], bits[idx], mat[idx], self.crop)
        return intensity_augment(out_img, spec, gen, inplace=True), out_bits

    @torch.no_grad()
    def __call__(
        self, batch: dict[str, torch.Tensor], n_tasks: int, gen: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """batch: ref_image/query_image (n,1,*S) float32 or float16, ref_bits/query_bits
        (n,1,*S) int32, or int16 holding the n_tasks <= 16 bits (``PairStream(compact=True)``).

        Returns images (n,1,crop^3) float32 and masks (n,n_tasks,crop^3) bool: the same for
        both input types (float16 values are exact in float32).
        """
        ref_img, ref_b = self._one(batch["ref_image"], batch["ref_bits"], self.weak, gen, n_tasks)
        q_img, q_b = self._one(batch["query_image"], batch["query_bits"], self.strong, gen, n_tasks)
        return {
            "ref_image": ref_img,
            "ref_masks": unpack_bits(ref_b, n_tasks),
            "query_image": q_img,
            "query_masks": unpack_bits(q_b, n_tasks),
        }
