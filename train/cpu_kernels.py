"""Fused C loops for the CPU augmentation path, compiled on first use; None when unavailable.

Why: on the CPU, ATen's 3-D ``grid_sample`` is scalar (~45 ns/voxel) and even the
two vectorised 2-D passes (``paired_augment._two_pass_linear``) cost ~30 ns per
output voxel, plus ~10 ns for the nearest-neighbour gather of the mask bits,
each stage a separate pass over tens of MB. One C loop per output row computes
each point's input coordinates (vectorised), samples the image trilinearly (8
neighbours, border clamp: what the GPU's 3-D ``grid_sample`` computes) and
gathers the bit field at the rounded point: ~20 ns per voxel for a random strong
affine of a 160^3 crop on the 2-core CI VM (~8 for the identity; the rest is
cache misses of the rotated access pattern), ~1.9x the torch route on the same
pairs. The blur (7-tap loop per axis), the bit unpack (streaming stores) and the
sampler's label histograms and bit lookups (``train.crop_masks``) are small loops.

The source below is compiled once per machine with the system C compiler
(``cc``/``gcc``/``clang``, or ``$CC``) into a cache directory
(``$MASKBANK_KERNEL_CACHE``, default ``~/.cache/maskbank/kernels``) and loaded
with ``ctypes``; the file name hashes the source, flags and CPU, and it is
written atomically under a lock, so concurrent workers and shared home directories are safe.
Loading a shared library runs its constructors, so a library someone else planted there
would run their code in every worker: the cache folder is created 0700, and a folder (or
an ancestor) or file that another user or group could write, or a symlink, is refused
(``RuntimeWarning``; the kernels are then built in a private temporary folder for this
process). The SHA-256 of each build is recorded beside it (``augment-*.json``) and a
library whose bytes no longer match is rebuilt, never loaded.
No compiler, a failed build or ``MASKBANK_C_KERNELS=0`` -> ``kernels()`` is None
and callers take their pure-torch path (same draws and masks; the image agrees up to
interpolation error; tests run both).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* Output voxel (u,v,w) -> input point p = c + m @ (u-h, v-h, w-h), c = (n-1)/2 per axis,
   in float32. Image: trilinear with the point clamped into [0, n-1] per axis (3-D
   grid_sample, border padding, align_corners). Bits: the voxel at floor(p + 0.5), 0
   outside the input. Per output row, a branch-free loop computes every voxel's corner
   index, weights and bit index (vectorised), then a scalar loop does the loads: AVX2
   gathers are slow on AMD cores (~15% slower in total than scalar loads here), and the
   scalar loop prefetches the lines it needs next (~18%). */
#define MAXO 4096
#define PF 16 /* prefetch distance (voxels): ~18% faster than none, 8 and 32 in between */
#ifdef __GNUC__
#define NOVEC __attribute__((optimize("no-tree-vectorize")))
#else
#define NOVEC
#endif
/* IEEE half (bits) -> float: F16C when compiled for it, else exact bit arithmetic. */
#ifdef __F16C__
#include <immintrin.h>
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_to_float(uint16_t h)
{
    const uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    union { uint32_t u; float f; } r;
    if (e == 0x1f) r.u = s | 0x7f800000u | (m << 13); /* inf, nan */
    else if (e) r.u = s | ((e + 112) << 23) | (m << 13); /* normal */
    else { r.f = (float)m * 5.9604644775390625e-8f; r.u |= s; } /* zero, subnormal: m * 2^-24 */
    return r.f;
}
#endif
#define WARP(NAME, TIMG, LD, TBITS, TOUT)                                                  \
NOVEC static void NAME##_loads(const TIMG *restrict img, const TBITS *restrict bits,      \
    long out, const int32_t *restrict base, const float *restrict fxa,                     \
    const float *restrict fya, const float *restrict fza, const int32_t *restrict dxa,     \
    const int32_t *restrict dya, const int32_t *restrict dza, const int32_t *restrict bi,  \
    float *restrict oi, TOUT *restrict ob)                                                 \
{                                                                                          \
    for (long w = 0; w < out; w++) {                                                       \
        if (w + PF < out) { /* the row's addresses are known: prefetch PF voxels ahead */  \
            const TIMG *q = img + base[w + PF];                                            \
            __builtin_prefetch(q);                                                         \
            __builtin_prefetch(q + dya[w + PF]);                                           \
            __builtin_prefetch(q + dxa[w + PF]);                                           \
            __builtin_prefetch(q + dxa[w + PF] + dya[w + PF]);                             \
            if (bi[w + PF] >= 0) __builtin_prefetch(bits + bi[w + PF]);                    \
        }                                                                                  \
        const TIMG *p = img + base[w];                                                     \
        const int dx = dxa[w], dy = dya[w], dz = dza[w];                                   \
        const float fx = fxa[w], fy = fya[w], fz = fza[w];                                 \
        const float a0 = LD(p[0]), a1 = LD(p[dz]), a2 = LD(p[dy]), a3 = LD(p[dy + dz]);    \
        const float a4 = LD(p[dx]), a5 = LD(p[dx + dz]), a6 = LD(p[dx + dy]);              \
        const float a7 = LD(p[dx + dy + dz]);                                              \
        const float c00 = a0 + fz * (a1 - a0), c01 = a2 + fz * (a3 - a2);                  \
        const float c10 = a4 + fz * (a5 - a4), c11 = a6 + fz * (a7 - a6);                  \
        const float c0 = c00 + fy * (c01 - c00), c1 = c10 + fy * (c11 - c10);              \
        oi[w] = c0 + fx * (c1 - c0);                                                       \
        const int j = bi[w];                                                               \
        ob[w] = j >= 0 ? (TOUT)bits[j] : (TOUT)0;                                          \
    }                                                                                      \
}                                                                                          \
void NAME(const TIMG *restrict img, const TBITS *restrict bits, long X, long Y, long Z,  \
          const double *m, long out, float *restrict oimg, TOUT *restrict obits)            \
{                                                                                          \
    const double h = (out - 1) / 2.0;                                                      \
    const double cx = (X - 1) / 2.0, cy = (Y - 1) / 2.0, cz = (Z - 1) / 2.0;               \
    const int sx = (int)(Y * Z), sy = (int)Z, iX = (int)X, iY = (int)Y, iZ = (int)Z;       \
    const float fX = (float)(X - 1), fY = (float)(Y - 1), fZ = (float)(Z - 1);             \
    const float m2 = (float)m[2], m5 = (float)m[5], m8 = (float)m[8];                      \
    int32_t base[MAXO], dxa[MAXO], dya[MAXO], dza[MAXO], bi[MAXO];                         \
    float fxa[MAXO], fya[MAXO], fza[MAXO];                                                 \
    for (long u = 0; u < out; u++) {                                                       \
        const double ou = u - h;                                                           \
        for (long v = 0; v < out; v++) {                                                   \
            const double ov = v - h;                                                       \
            const float bx = (float)(cx + m[0] * ou + m[1] * ov);                          \
            const float by = (float)(cy + m[3] * ou + m[4] * ov);                          \
            const float bz = (float)(cz + m[6] * ou + m[7] * ov);                          \
            for (int w = 0; w < out; w++) {                                                \
                const float ow = (float)(w - h);                                           \
                const float px = bx + m2 * ow, py = by + m5 * ow, pz = bz + m8 * ow;       \
                const int rx = (int)floorf(px + 0.5f), ry = (int)floorf(py + 0.5f);        \
                const int rz = (int)floorf(pz + 0.5f);                                     \
                const int in = (rx >= 0) & (rx < iX) & (ry >= 0) & (ry < iY) & (rz >= 0)   \
                               & (rz < iZ);                                                \
                bi[w] = in ? rx * sx + ry * sy + rz : -1;                                  \
                const float qx = px < 0.f ? 0.f : (px > fX ? fX : px);                     \
                const float qy = py < 0.f ? 0.f : (py > fY ? fY : py);                     \
                const float qz = pz < 0.f ? 0.f : (pz > fZ ? fZ : pz);                     \
                const float lx = floorf(qx), ly = floorf(qy), lz = floorf(qz);             \
                const int x0 = (int)lx, y0 = (int)ly, z0 = (int)lz;                        \
                fxa[w] = qx - lx;                                                          \
                fya[w] = qy - ly;                                                          \
                fza[w] = qz - lz;                                                          \
                dxa[w] = x0 < iX - 1 ? sx : 0;                                             \
                dya[w] = y0 < iY - 1 ? sy : 0;                                             \
                dza[w] = z0 < iZ - 1 ? 1 : 0;                                              \
                base[w] = x0 * sx + y0 * sy + z0;                                          \
            }                                                                              \
            const long o = (u * out + v) * out;                                            \
            NAME##_loads(img, bits, out, base, fxa, fya, fza, dxa, dya, dza, bi, oimg + o, \
                         obits + o);                                                       \
        }                                                                                  \
    }                                                                                      \
}

#define LDF32(v) (v)
WARP(warp_bits16, float, LDF32, int32_t, int16_t)
WARP(warp_bits32, float, LDF32, int32_t, int32_t)
WARP(warp_f16_bits16, uint16_t, half_to_float, int16_t, int16_t)
WARP(warp_f16_bits16_32, uint16_t, half_to_float, int16_t, int32_t) /* sign-extended: torch's cast */
WARP(warp_f32_bits16, float, LDF32, int16_t, int16_t)
WARP(warp_f32_bits16_32, float, LDF32, int16_t, int32_t)

/* out[j, v] = bit j of field[v] (0/1 bytes) for j < k, blocked over v so that each
   block of the field stays in L1 while its k planes are written. */
#define UNPACK(NAME, TIN)                                                                  \
void NAME(const TIN *restrict field, long n, long k, uint8_t *restrict out)                \
{                                                                                          \
    for (long v0 = 0; v0 < n; v0 += 4096) {                                                \
        const long v1 = v0 + 4096 < n ? v0 + 4096 : n;                                     \
        for (long j = 0; j < k; j++) {                                                     \
            uint8_t *restrict o = out + j * n;                                             \
            for (long v = v0; v < v1; v++) o[v] = (uint8_t)((field[v] >> j) & 1);          \
        }                                                                                  \
    }                                                                                      \
}

UNPACK(unpack16_plain, uint16_t)
UNPACK(unpack32, uint32_t)

/* unpack16_plain with AVX2 when the planes are 32-byte aligned: 32 voxels per step, written
   with streaming stores (the 14 planes of a 128^3 crop, 29 MB, never fit a cache: skipping
   the read-for-ownership halves the memory traffic, ~2x faster). */
void unpack16(const uint16_t *restrict field, long n, long k, uint8_t *restrict out)
{
#ifdef __AVX2__
    if (n % 32 == 0 && ((uintptr_t)out & 31) == 0) {
        const __m256i one = _mm256_set1_epi16(1);
        for (long v0 = 0; v0 < n; v0 += 4096) {
            const long v1 = v0 + 4096 < n ? v0 + 4096 : n;
            for (long j = 0; j < k; j++) {
                uint8_t *restrict o = out + j * n;
                const __m128i sh = _mm_cvtsi32_si128((int)j);
                for (long v = v0; v < v1; v += 32) {
                    __m256i a = _mm256_loadu_si256((const __m256i *)(field + v));
                    __m256i b = _mm256_loadu_si256((const __m256i *)(field + v + 16));
                    a = _mm256_and_si256(_mm256_srl_epi16(a, sh), one);
                    b = _mm256_and_si256(_mm256_srl_epi16(b, sh), one);
                    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0xD8);
                    _mm256_stream_si256((__m256i *)(o + v), p);
                }
            }
        }
        _mm_sfence();
        return;
    }
#endif
    unpack16_plain(field, n, k, out);
}

/* Label boxes: (n0, n1, n2) views with element strides (s0, s1) and a contiguous last axis. */

/* dst |= lut[src]; returns the number of labels >= nlut (those voxels are left unchanged). */
long lut_or_u16(const uint16_t *restrict src, long s0, long s1, const uint16_t *restrict lut,
                long nlut, uint16_t *restrict dst, long d0, long d1, long n0, long n1, long n2)
{
    long bad = 0;
    for (long i = 0; i < n0; i++)
        for (long j = 0; j < n1; j++) {
            const uint16_t *a = src + i * s0 + j * s1;
            uint16_t *b = dst + i * d0 + j * d1;
            for (long k = 0; k < n2; k++) {
                const uint16_t v = a[k];
                if (v < nlut) b[k] |= lut[v]; else bad++;
            }
        }
    return bad;
}

/* hist[v] += voxels of label v (< nbins) through four interleaved int32 sub-histograms
   (runs of one label would otherwise chain every increment on the last one); scratch holds
   4 * nbins zeros. Returns the number of labels >= nbins (not counted). */
long hist_u16(const uint16_t *restrict src, long s0, long s1, long n0, long n1, long n2,
              int64_t *restrict hist, long nbins, int32_t *restrict scratch)
{
    long bad = 0;
    int32_t *h0 = scratch, *h1 = scratch + nbins, *h2 = scratch + 2 * nbins;
    int32_t *h3 = scratch + 3 * nbins;
    for (long i = 0; i < n0; i++)
        for (long j = 0; j < n1; j++) {
            const uint16_t *a = src + i * s0 + j * s1;
            long k = 0;
            for (; k + 4 <= n2; k += 4) {
                const uint16_t v0 = a[k], v1 = a[k + 1], v2 = a[k + 2], v3 = a[k + 3];
                if ((v0 < nbins) & (v1 < nbins) & (v2 < nbins) & (v3 < nbins)) {
                    h0[v0]++; h1[v1]++; h2[v2]++; h3[v3]++;
                } else {
                    for (long q = k; q < k + 4; q++) { if (a[q] < nbins) h0[a[q]]++; else bad++; }
                }
            }
            for (; k < n2; k++) { if (a[k] < nbins) h0[a[k]]++; else bad++; }
        }
    for (long v = 0; v < nbins; v++) hist[v] += (int64_t)h0[v] + h1[v] + h2[v] + h3[v];
    return bad;
}

/* out[a, i, b] = sum_t k[t] * in[a, clamp(i + t - r, 0, n - 1), b]: one axis of a
   separable filter with replicate borders, (outer, n, inner) layout. */
void filter_axis(const float *restrict in, float *restrict out, long outer, long n,
                 long inner, const float *restrict k, long r)
{
    for (long a = 0; a < outer; a++) {
        const float *src = in + a * n * inner;
        float *restrict dst = out + a * n * inner;
        if (inner == 1) {  /* interior: shifted rows (vectorises); ends: clamped taps */
            const long lo = r < n ? r : n, hi = n - r > lo ? n - r : lo;
            for (long i = lo; i < hi; i++) dst[i] = 0.0f;
            for (long t = -r; t <= r; t++) {
                const float kt = k[t + r];
                for (long i = lo; i < hi; i++) dst[i] += kt * src[i + t];
            }
            for (long i = 0; i < n; i++) {
                if (i == lo && hi > lo) i = hi;
                if (i >= n) break;
                float acc = 0.0f;
                for (long t = -r; t <= r; t++) {
                    long j = i + t;
                    j = j < 0 ? 0 : (j > n - 1 ? n - 1 : j);
                    acc += k[t + r] * src[j];
                }
                dst[i] = acc;
            }
            continue;
        }
        for (long i = 0; i < n; i++) {
            float *restrict d = dst + i * inner;
            for (long b = 0; b < inner; b++) d[b] = 0.0f;
            for (long t = -r; t <= r; t++) {
                long j = i + t;
                j = j < 0 ? 0 : (j > n - 1 ? n - 1 : j);
                const float *restrict s = src + j * inner;
                const float kt = k[t + r];
                for (long b = 0; b < inner; b++) d[b] += kt * s[b];
            }
        }
    }
}
"""

# gcc keeps gathers off by default on AMD (its cost model); they make the warp loop ~2x faster
# here. -fno-trapping-math lets floorf vectorise (no FP exception semantics: same results).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-trapping-math", "-mtune-ctrl=use_gather"],
    ["-O3", "-march=native", "-fno-trapping-math"],
    ["-O3", "-fno-trapping-math"],
    ["-O3"],
)
# (image, bits, out_bits) dtypes -> compiled warp; int16 bits -> int32 out: sign-extended.
_WARPS = {
    (torch.float32, torch.int32, torch.int16): "warp_bits16",
    (torch.float32, torch.int32, torch.int32): "warp_bits32",
    (torch.float16, torch.int16, torch.int16): "warp_f16_bits16",
    (torch.float16, torch.int16, torch.int32): "warp_f16_bits16_32",
    (torch.float32, torch.int16, torch.int16): "warp_f32_bits16",
    (torch.float32, torch.int16, torch.int32): "warp_f32_bits16_32",
}
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_TRIED = False
REASON = "not built yet"


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "|" + "".join(lines)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


class _Refused(Exception):
    """A cache folder or file that someone else could have written: never loaded."""


def _private(path: Path, want_dir: bool) -> None:
    """Raise ``_Refused`` unless ``path`` (not followed) is ours alone: our uid, not a link,
    not writable by group or others. Why: whoever can write the library picks the code
    that its constructor runs in every process that loads it."""
    _check_owner(os.stat(path, follow_symlinks=False), path, want_dir)


def _check_owner(st: os.stat_result, path: Path, want_dir: bool) -> None:
    kind = "folder" if want_dir else "file"
    if stat.S_ISLNK(st.st_mode):
        raise _Refused(f"{path} is a symbolic link")
    if not (stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)):
        raise _Refused(f"{path} is not a regular {kind}")
    if st.st_uid != os.getuid():
        raise _Refused(f"{kind} {path} is owned by uid {st.st_uid}, not by you ({os.getuid()})")
    if st.st_mode & 0o022:
        raise _Refused(
            f"{kind} {path} is writable by group or others (mode {st.st_mode & 0o777:o})"
        )


def _private_cache(cache: Path) -> Path:
    """Create ``cache`` (each missing component mode 0700) and check it and its ancestors.

    The cache folder itself must be ours alone; each ancestor (symlinks resolved) must belong
    to us or root and be writable by nobody else unless sticky (/tmp): otherwise its owner or
    group could swap the folder for one of theirs."""
    cache = Path(os.path.abspath(cache))
    missing = []
    for part in (cache, *cache.parents):
        if os.path.lexists(part):
            break
        missing.append(part)
    for part in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent worker's: checked below
            part.mkdir(mode=0o700)
    _private(cache, want_dir=True)
    for part in (p := Path(os.path.realpath(cache.parent)), *p.parents):
        st = os.stat(part)
        if st.st_uid not in (0, os.getuid()):
            raise _Refused(f"its parent {part} is owned by uid {st.st_uid}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise _Refused(f"its parent {part} is writable by group or others")
    return cache


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _load_verified(lib: Path, sha256: str) -> ctypes.CDLL:
    """dlopen ``lib`` only if it is ours alone and its bytes hash to ``sha256``.

    The file is opened once (no symlink followed) and loaded through /proc/self/fd, so the
    bytes that were hashed are the bytes that get mapped."""
    fd = os.open(lib, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _check_owner(os.fstat(fd), lib, want_dir=False)
        got = _sha256_fd(fd)
        if got != sha256:
            raise _Refused(f"{lib} has SHA-256 {got[:16]}..., not the {sha256[:16]}... recorded")
        via_fd = f"/proc/self/fd/{fd}"
        return ctypes.CDLL(via_fd if os.path.exists(via_fd) else str(lib))
    finally:
        os.close(fd)


def _recorded_sha256(record: Path) -> str | None:
    """The SHA-256 recorded when the library was built; None if missing or not ours alone."""
    try:
        _private(record, want_dir=False)
        return str(json.loads(record.read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError, _Refused):
        return None


def _compile(cc: str, flags: list[str], workdir: Path) -> Path:
    """Compile the source in ``workdir`` (a private folder); raise ``RuntimeError`` on failure.

    The source path is relative so that every build of one key gives the same bytes."""
    (workdir / "augment.c").write_text(_SOURCE)
    cmd = [cc, *flags, "-fPIC", "-shared", "-o", "augment.so", "augment.c"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:-3])} failed: {proc.stderr.strip()[-300:]}")
    out = workdir / "augment.so"
    out.chmod(0o700)  # whatever the umask: a group-writable file would be refused later
    return out


def _sha256_file(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _sha256_fd(fd)
    finally:
        os.close(fd)


def _cached_build(cache: Path, key: str, cc: str, flags: list[str]) -> tuple[ctypes.CDLL, Path]:
    """Load the cached library of ``key`` if its recorded hash matches, else (re)build it.

    Under an exclusive lock on the cache, so concurrent workers build once and a library is
    never paired with another build's record."""
    lib = cache / f"augment-{key[:20]}.so"
    record = cache / f"augment-{key[:20]}.json"
    lock_fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        sha = _recorded_sha256(record)
        if sha is not None and os.path.lexists(lib):
            try:
                return _load_verified(lib, sha), lib
            except _Refused as exc:
                warnings.warn(
                    f"maskbank C kernels: not loading {exc}; rebuilding it (if this repeats, "
                    f"someone else can write to {cache}: point MASKBANK_KERNEL_CACHE elsewhere)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        # no record (first use, or a cache of an older maskbank): build, then record the hash
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = _compile(cc, flags, Path(tmp))
            sha = _sha256_file(built)
            os.replace(built, lib)
            with tempfile.NamedTemporaryFile("w", dir=cache, suffix=".json", delete=False) as fh:
                json.dump({"sha256": sha, "compiler": cc, "flags": flags}, fh)
            os.replace(fh.name, record)
        return _load_verified(lib, sha), lib
    finally:
        os.close(lock_fd)  # releases the lock


def _private_build(cc: str, flags: list[str]) -> tuple[ctypes.CDLL, Path]:
    """Build into a fresh private temporary folder, load, and delete it (nothing cached)."""
    with tempfile.TemporaryDirectory(prefix="maskbank-kernels-") as tmp:
        built = _compile(cc, flags, Path(tmp))
        return _load_verified(built, _sha256_file(built)), built


def _build() -> ctypes.CDLL | None:
    global REASON
    if os.environ.get("MASKBANK_C_KERNELS", "1") == "0":
        REASON = "disabled by MASKBANK_C_KERNELS=0"
        return None
    cc = _compiler()
    if cc is None:
        REASON = "no C compiler (cc, gcc, clang or $CC) found"
        return None
    cache: Path | None = Path(
        os.environ.get("MASKBANK_KERNEL_CACHE") or Path.home() / ".cache" / "maskbank" / "kernels"
    )
    try:
        cache = _private_cache(cache)
    except (OSError, _Refused) as exc:
        warnings.warn(
            f"maskbank C kernels: not using the cache folder {cache}: {exc}. Building them in a "
            "private temporary folder for this process instead; to cache them, make the folder and "
            "its parents writable by you alone (chmod go-w) or set MASKBANK_KERNEL_CACHE to a "
            "private folder",
            RuntimeWarning,
            stacklevel=3,
        )
        cache = None
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, _cpu_tag()]).encode()).hexdigest()
        try:
            if cache is None:
                out, lib = _private_build(cc, flags)
            else:
                out, lib = _cached_build(cache, key, cc, flags)
        except RuntimeError as exc:  # the compiler rejected these flags: try the next set
            REASON = str(exc)
            continue
        except (OSError, subprocess.SubprocessError, _Refused) as exc:
            REASON = f"cannot build or load in {cache or 'a temporary folder'}: {exc}"
            continue
        vp, lg = ctypes.c_void_p, ctypes.c_long
        for name in set(_WARPS.values()):
            fn = getattr(out, name)
            fn.argtypes = [vp, vp, lg, lg, lg, vp, lg, vp, vp]
            fn.restype = None
        out.lut_or_u16.argtypes = [vp, lg, lg, vp, lg, vp, lg, lg, lg, lg, lg]
        out.lut_or_u16.restype = lg
        out.hist_u16.argtypes = [vp, lg, lg, lg, lg, lg, vp, lg, vp]
        out.hist_u16.restype = lg
        for name in ("unpack16", "unpack32"):
            fn = getattr(out, name)
            fn.argtypes = [vp, lg, lg, vp]
            fn.restype = None
        out.filter_axis.argtypes = [vp, vp, lg, lg, lg, vp, lg]
        out.filter_axis.restype = None
        REASON = f"built with {cc} {' '.join(flags)}: {lib}"
        return out
    return None


def kernels() -> ctypes.CDLL | None:
    """The compiled library (built on the first call in a process), or None (see ``REASON``)."""
    global _LIB, _TRIED
    if not _TRIED:
        with _LOCK:
            if not _TRIED:
                _LIB = _build()
                _TRIED = True
    return _LIB


def _ptr(t: torch.Tensor, dtype: torch.dtype) -> int:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"need a contiguous CPU {dtype} tensor, got {t.dtype} {tuple(t.stride())}")
    return t.data_ptr()


def warp_fused(
    image: torch.Tensor,
    bits: torch.Tensor,
    mat: list[list[float]],
    out: int,
    out_image: torch.Tensor,
    out_bits: torch.Tensor,
) -> None:
    """One volume: ``out_image`` (out^3 float32) trilinear, ``out_bits`` (int16/int32) nearest.

    ``image`` (X,Y,Z) float32 or float16 (read as it is: ~17% faster with int16 bits, the
    input crop with its margin is larger than the caches) and ``bits`` int32, or int16
    (int32 ``out_bits`` then sign-extended), contiguous (the types in ``_WARPS``); ``mat``
    maps output offsets to input offsets about the centres (as ``voxel_coords``).
    """
    lib = kernels()
    if lib is None:
        raise RuntimeError(f"C kernels unavailable: {REASON}")
    X, Y, Z = image.shape
    if tuple(bits.shape) != (X, Y, Z) or out_image.numel() != out**3 or out_bits.numel() != out**3:
        raise ValueError("shape mismatch")
    if X * Y * Z >= 2**31 or out > 4096:
        raise ValueError(f"volume {tuple(image.shape)} / output {out} outside the kernel's range")
    if out_bits.dtype not in (torch.int16, torch.int32):
        raise ValueError(f"out_bits must be int16 or int32, got {out_bits.dtype}")
    m = np.ascontiguousarray(mat, dtype=np.float64).reshape(9)
    name = _WARPS.get((image.dtype, bits.dtype, out_bits.dtype))
    if name is None:
        raise ValueError(f"no warp for {image.dtype} / {bits.dtype} -> {out_bits.dtype}")
    getattr(lib, name)(
        _ptr(image, image.dtype),
        _ptr(bits, bits.dtype),
        X,
        Y,
        Z,
        m.ctypes.data,
        out,
        _ptr(out_image, torch.float32),
        _ptr(out_bits, out_bits.dtype),
    )


def filter_axis(src: torch.Tensor, dst: torch.Tensor, axis: int, kernel: np.ndarray) -> None:
    """``dst`` = 1-D filter of the 3-D float32 ``src`` along ``axis`` (odd taps, replicate border)."""
    lib = kernels()
    if lib is None:
        raise RuntimeError(f"C kernels unavailable: {REASON}")
    shape = tuple(src.shape)
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    k = np.ascontiguousarray(kernel, dtype=np.float32)
    if tuple(dst.shape) != shape or len(k) % 2 != 1:
        raise ValueError("shape mismatch or even kernel")
    lib.filter_axis(
        _ptr(src, torch.float32),
        _ptr(dst, torch.float32),
        outer,
        shape[axis],
        inner,
        k.ctypes.data,
        len(k) // 2,
    )


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_RETAINED = False


def retain_freed_memory(max_block: int = 64 << 20) -> bool:
    """Keep freed blocks of up to ``max_block`` bytes in the process heap (glibc); True if set.

    Why: every pair allocates ~150 MB of crops, warped volumes and unpacked masks
    (blocks of 4-29 MB). glibc serves blocks above its mmap threshold (at most 32 MB,
    adaptive) with fresh ``mmap`` pages and returns them on ``free``, so every pair
    page-faults its buffers in again: ~1 us per 4 KiB page on this VM, ~35 ms per
    pair. With the mmap threshold raised to ``max_block`` and trimming off, freed
    blocks are reused by the next pair. Costs: the heap keeps its peak size (a
    worker's working set, a few hundred MB). Process-wide; a no-op off glibc. Called by
    the trainer and by each DataLoader worker (``pair_sampler.make_loader``).
    """
    global _RETAINED
    if _RETAINED:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(max_block)) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _RETAINED = ok
    return ok


def unpack(field: torch.Tensor, k: int, out: torch.Tensor) -> None:
    """``out`` (k, V) uint8/bool = bits 0..k-1 of the int16/int32 ``field`` (V voxels)."""
    lib = kernels()
    if lib is None:
        raise RuntimeError(f"C kernels unavailable: {REASON}")
    size = field.element_size()
    if field.dtype not in (torch.int16, torch.int32) or k > 8 * size:
        raise ValueError(f"cannot unpack {k} bits of a {field.dtype} field")
    n = field.numel()
    if out.dtype not in (torch.uint8, torch.bool) or out.numel() != k * n:
        raise ValueError("out must be k x voxels of uint8 or bool")
    fn = lib.unpack16 if size == 2 else lib.unpack32
    fn(_ptr(field, field.dtype), n, k, _ptr(out, out.dtype))


def _box_ok(a: np.ndarray) -> bool:
    return a.ndim == 3 and a.dtype == np.uint16 and (a.strides[2] == 2 or a.shape[2] <= 1)


def lut_or_u16(src: np.ndarray, lut: np.ndarray, dst: np.ndarray) -> bool:
    """``dst |= lut[src]`` for uint16 3-D views (last axis contiguous); False: not handled."""
    lib = kernels()
    if (
        lib is None
        or not (_box_ok(src) and _box_ok(dst) and src.shape == dst.shape)
        or lut.dtype != np.uint16
        or not dst.flags.writeable
    ):
        return False
    lut = np.ascontiguousarray(lut)
    bad = lib.lut_or_u16(
        src.ctypes.data, src.strides[0] // 2, src.strides[1] // 2, lut.ctypes.data, len(lut),
        dst.ctypes.data, dst.strides[0] // 2, dst.strides[1] // 2, *src.shape,
    )  # fmt: skip
    if bad:
        raise IndexError(f"{bad} labels outside the lookup table of {len(lut)} entries")
    return True


def hist_u16(src: np.ndarray, nbins: int) -> np.ndarray | None:
    """int64 histogram (``nbins`` bins) of a uint16 3-D view; None: not handled here
    (no kernels, another layout, or labels >= nbins)."""
    lib = kernels()
    if lib is None or not _box_ok(src) or nbins <= 0:
        return None
    hist = np.zeros(nbins, np.int64)
    scratch = np.zeros(4 * nbins, np.int32)
    bad = lib.hist_u16(
        src.ctypes.data, src.strides[0] // 2, src.strides[1] // 2, *src.shape,
        hist.ctypes.data, nbins, scratch.ctypes.data,
    )  # fmt: skip
    return None if bad else hist
