"""The compiled CPU loops agree with the torch reference paths, and everything works without them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from train import cpu_kernels
from train.paired_augment import (
    STRONG,
    PairAugmenter,
    _gaussian_blur,
    _gaussian_blur_c,
    _nearest_bits,
    _warp_image_3d,
    pack_bits,
    random_affine,
    sampling_grid,
    unpack_bits,
    warp,
)

from .conftest import REPO

needs_kernels = pytest.mark.skipif(
    cpu_kernels.kernels() is None, reason=f"C kernels unavailable: {cpu_kernels.REASON}"
)


@needs_kernels
@pytest.mark.parametrize("n_bits", [14, 20])
def test_fused_warp_is_trilinear_and_nearest(n_bits):
    """Image = 3-D trilinear grid_sample (border), bits = the torch nearest gather, same points."""
    g = torch.Generator().manual_seed(3)
    size = (37, 42, 45)
    img = torch.randn(4, 1, *size, generator=g)
    bits = torch.randint(0, 2 ** (n_bits - 1), (4, 1, *size), dtype=torch.int32, generator=g)
    # Zoom-out and zoom-in both: border clamping and zero bits outside get exercised.
    mat = random_affine(4, replace(STRONG, p_affine=1.0), g, "cpu")
    mat[0] *= 1.6
    out_img, out_bits = warp(img, bits, mat, 33, n_bits)
    assert out_bits.dtype == (torch.int16 if n_bits <= 16 else torch.int32)
    want = _warp_image_3d(img, mat, 33)
    assert (out_img - want).abs().max() < 1e-4
    ref = _nearest_bits(bits, mat, 33, n_bits)
    assert (out_bits != ref).float().mean() < 1e-3  # float rounding at .5 ties only
    assert (out_bits == 0).any() and (out_bits != 0).float().mean() > 0.5


@needs_kernels
def test_fused_warp_identity_is_the_centre_crop():
    g = torch.Generator().manual_seed(5)
    img = torch.randn(1, 1, 20, 24, 22, generator=g)
    bits = torch.randint(0, 2**13, (1, 1, 20, 24, 22), dtype=torch.int32, generator=g)
    out_img, out_bits = warp(img, bits, torch.eye(3)[None], 16, 14)
    lo = [(s - 16) // 2 for s in (20, 24, 22)]
    box = (..., slice(lo[0], lo[0] + 16), slice(lo[1], lo[1] + 16), slice(lo[2], lo[2] + 16))
    assert torch.equal(out_img, img[box]) and torch.equal(out_bits.int(), bits[box])


@needs_kernels
def test_fused_masks_match_per_channel_nearest_grid_sample():
    g = torch.Generator().manual_seed(8)
    masks = torch.rand(2, 15, 30, 34, 28, generator=g) > 0.6
    img = torch.randn(2, 1, 30, 34, 28, generator=g)
    mat = random_affine(2, replace(STRONG, p_affine=1.0), g, "cpu")
    _, bits = warp(img, pack_bits(masks), mat, 24, 15)
    want = F.grid_sample(
        masks.float(), sampling_grid(mat, (30, 34, 28), 24), mode="nearest", align_corners=True
    )
    assert (unpack_bits(bits, 15) != (want > 0.5)).float().mean() < 1e-3


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 4, 7), (20, 9, 16)])
def test_c_blur_matches_the_shifted_view_blur(shape):
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 1, *shape, generator=g)
    sig = torch.tensor([0.5, 1.0])
    assert (_gaussian_blur_c(img, sig) - _gaussian_blur(img, sig)).abs().max() < 1e-5


def test_augmenter_without_kernels(monkeypatch):
    """No compiler: the torch route gives the same shapes/dtypes and nearly the same images."""
    g = torch.Generator().manual_seed(2)
    batch = {
        "ref_image": torch.randn(2, 1, 24, 24, 24, generator=g),
        "query_image": torch.randn(2, 1, 24, 24, 24, generator=g),
        "ref_bits": torch.randint(0, 2**5, (2, 1, 24, 24, 24), dtype=torch.int32, generator=g),
        "query_bits": torch.randint(0, 2**5, (2, 1, 24, 24, 24), dtype=torch.int32, generator=g),
    }
    aug = PairAugmenter(16)
    spec = replace(STRONG, p_blur=1.0)
    aug.strong = spec
    fast = aug(batch, 5, torch.Generator().manual_seed(0))
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    slow = aug(batch, 5, torch.Generator().manual_seed(0))
    for key in fast:
        assert fast[key].shape == slow[key].shape and fast[key].dtype == slow[key].dtype
    assert (fast["query_masks"] != slow["query_masks"]).float().mean() < 1e-3
    # Two-pass bilinear vs trilinear on white noise: same scale, small mean difference.
    diff = (fast["query_image"] - slow["query_image"]).abs().mean()
    assert diff < 0.1 * slow["query_image"].abs().mean(), diff


def _probe(env: dict) -> str:
    code = "from train import cpu_kernels as c; print(c.kernels() is None, '|', c.REASON)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_disabled_or_failing_compiler_falls_back(tmp_path):
    assert _probe({"MASKBANK_C_KERNELS": "0"}).startswith("True | disabled")
    out = _probe({"CC": "false", "MASKBANK_KERNEL_CACHE": str(tmp_path)})
    assert out.startswith("True |") and "failed" in out, out
    assert not list(tmp_path.glob("*.so"))


def test_retain_freed_memory_is_idempotent():
    first = cpu_kernels.retain_freed_memory()
    assert cpu_kernels.retain_freed_memory() == first
    if sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION"):
        assert first


@needs_kernels
def test_label_kernels_match_numpy_on_strided_views():
    import numpy as np

    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 300, (20, 24, 28)).astype(np.uint16)
    chunk[3:9, 4:12, 5:25] = 7  # long runs of one label (the interleaved sub-histograms)
    view = chunk[2:19, 3:22, 1:27]
    hist = cpu_kernels.hist_u16(view, 300)
    np.testing.assert_array_equal(hist, np.bincount(view.ravel(), minlength=300))
    assert cpu_kernels.hist_u16(view, 200) is None  # labels past the bins: caller's path
    lut = np.zeros(300, np.uint16)
    lut[rng.integers(0, 300, 40)] = 1 << 3
    lut[7] |= 1 << 15
    field = np.full((30, 30, 40), 1 << 13, np.uint16)
    want = field.copy()
    box = (slice(5, 22), slice(1, 20), slice(10, 36))
    want[box] |= lut[view]
    assert cpu_kernels.lut_or_u16(view, lut, field[box])
    np.testing.assert_array_equal(field, want)
    with pytest.raises(IndexError):
        cpu_kernels.lut_or_u16(view, lut[:100], field[box])
    assert not cpu_kernels.lut_or_u16(view.astype(np.int32), lut, field[box])  # not uint16


@needs_kernels
@pytest.mark.parametrize("out_dtype", [torch.int16, torch.int32])
def test_float16_warp_equals_the_float32_warp(out_dtype):
    """float16 image / int16 bits read directly == the warp of their float32/int32 copies."""
    g = torch.Generator().manual_seed(4)
    img = torch.randn(30, 34, 28, generator=g).half()
    img[0, 0, 0] = 65504.0  # largest half, and a subnormal / negative zero
    img[1, 2, 3], img[2, 2, 2] = 3e-7, -0.0
    bits = torch.randint(-(2**15), 2**15, (30, 34, 28), dtype=torch.int32, generator=g)
    bits16 = bits.to(torch.int16)
    for m in ([[0.9, 0.3, 0.0], [-0.2, 1.1, 0.1], [0.05, 0.0, 1.2]], torch.eye(3).tolist()):
        a_img, a_bits = torch.empty(24, 24, 24), torch.empty(24, 24, 24, dtype=out_dtype)
        b_img, b_bits = torch.empty_like(a_img), torch.empty_like(a_bits)
        cpu_kernels.warp_fused(img.float(), bits16.to(torch.int32), m, 24, a_img, a_bits)
        for image in (img, img.float()):  # float16 or float32 image with int16 bits
            cpu_kernels.warp_fused(image, bits16, m, 24, b_img, b_bits)
            assert torch.equal(a_img, b_img) and torch.equal(a_bits, b_bits)


@pytest.mark.parametrize("compiled", [True, False])
def test_augmenter_takes_compact_batches(compiled, monkeypatch):
    """float16 images / int16 bits (PairStream(compact=True)) give exactly the float32 /
    int32 batch's output, on the compiled and on the torch route."""
    if compiled and cpu_kernels.kernels() is None:
        pytest.skip(cpu_kernels.REASON)
    if not compiled:
        monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    g = torch.Generator().manual_seed(3)
    wide = {
        "ref_image": torch.randn(2, 1, 24, 24, 24, generator=g).half().float(),
        "query_image": torch.randn(2, 1, 24, 24, 24, generator=g).half().float(),
        "ref_bits": torch.randint(0, 2**14, (2, 1, 24, 24, 24), dtype=torch.int32, generator=g),
        "query_bits": torch.randint(0, 2**14, (2, 1, 24, 24, 24), dtype=torch.int32, generator=g),
    }
    wide["ref_bits"][0, 0, :3] |= 1 << 14  # the top task bit (K + 1 = 15)
    compact = {k: v.half() if "image" in k else v.to(torch.int16) for k, v in wide.items()}
    aug = PairAugmenter(16)
    for seed in range(4):  # weak: identity, warped and mixed batches
        a = aug(wide, 15, torch.Generator().manual_seed(seed))
        b = aug(compact, 15, torch.Generator().manual_seed(seed))
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (seed, key)


def test_portable_half_conversion_equals_f16c(tmp_path):
    """Built without F16C (plain -O2), the bit-arithmetic half -> float gives the same warp."""
    import ctypes

    import numpy as np

    cc = cpu_kernels._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    src, lib = tmp_path / "k.c", tmp_path / "k.so"
    src.write_text(cpu_kernels._SOURCE)
    subprocess.run([cc, "-O2", "-fPIC", "-shared", "-o", str(lib), str(src)], check=True)
    so = ctypes.CDLL(str(lib))
    # zeros, normals, the largest half, subnormals (inf would turn its neighbours' lerps NaN)
    vals = torch.tensor([0.0, -0.0, 1.0, -2.5, 65504.0, 6e-8, 3e-5, -6.1e-5]).half()
    img = torch.cat([vals, torch.randn(27 * 8 - 8).half()]).view(6, 6, 6)
    bits = torch.zeros(6, 6, 6, dtype=torch.int16)
    out_img, out_bits = torch.empty(6, 6, 6), torch.empty(6, 6, 6, dtype=torch.int16)
    vp, lg = ctypes.c_void_p, ctypes.c_long
    so.warp_f16_bits16.argtypes = [vp, vp, lg, lg, lg, vp, lg, vp, vp]
    so.warp_f16_bits16.restype = None
    for mat in (np.eye(3), np.array([[0.9, 0.3, 0.0], [-0.2, 1.1, 0.1], [0.05, 0.0, 1.2]])):
        m = np.ascontiguousarray(mat.reshape(9))
        so.warp_f16_bits16(
            img.data_ptr(), bits.data_ptr(), 6, 6, 6, m.ctypes.data, 6,
            out_img.data_ptr(), out_bits.data_ptr(),
        )  # fmt: skip
        want = torch.empty(6, 6, 6)
        cpu_kernels.warp_fused(img.float(), bits.to(torch.int32), mat.tolist(), 6, want, out_bits)
        # FMA contraction may differ: rounding of the lerps, relative to the largest value
        assert torch.allclose(out_img, want, rtol=1e-6, atol=1e-6 * 65504)
        if mat[0, 1] == 0:  # the identity: the converted values themselves
            assert torch.equal(out_img, img.float())


# --- the kernel cache never loads a library someone else could have written -------------------

_PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void)
{
    FILE *f = fopen("%s", "w");
    if (f) { fputs("planted code ran", f); fclose(f); }
}
"""


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """Run ``cpu_kernels._build()`` afresh (quick flags) against a cache under ``tmp_path``;
    returns (cache, build) and restores the module's state afterwards."""
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler (cc, gcc, clang or $CC) to build the kernels")
    for name in ("REASON", "_LIB", "_TRIED"):
        monkeypatch.setattr(cpu_kernels, name, getattr(cpu_kernels, name))
    monkeypatch.setattr(cpu_kernels, "_FLAG_SETS", (["-O1"],))  # a faster build, same code
    monkeypatch.delenv("MASKBANK_C_KERNELS", raising=False)
    cache = tmp_path / "cache" / "kernels"
    monkeypatch.setenv("MASKBANK_KERNEL_CACHE", str(cache))
    return cache, cpu_kernels._build


def _plant(path, marker) -> None:
    """A shared library whose constructor writes ``marker`` when anything loads it."""
    src = path.parent / "planted.c"
    src.write_text(_PLANTED % marker)
    subprocess.run(
        [cpu_kernels._compiler(), "-shared", "-fPIC", "-o", str(path), str(src)], check=True
    )
    src.unlink()


def _blur_agrees(lib, monkeypatch) -> None:
    """The library loaded by a build computes what the torch route computes."""
    assert lib is not None, cpu_kernels.REASON
    monkeypatch.setattr(cpu_kernels, "_LIB", lib)
    monkeypatch.setattr(cpu_kernels, "_TRIED", True)
    img = torch.randn(2, 1, 12, 9, 10, generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([0.7, 1.2])
    assert (_gaussian_blur_c(img, sig) - _gaussian_blur(img, sig)).abs().max() < 1e-5


def test_first_use_builds_private_cache_and_replaced_library_is_rebuilt(
    fresh_build, tmp_path, monkeypatch
):
    cache, build = fresh_build
    _blur_agrees(build(), monkeypatch)  # first use: builds, records, loads
    assert cache.stat().st_mode & 0o777 == 0o700 and cache.parent.stat().st_mode & 0o777 == 0o700
    (lib,) = cache.glob("augment-*.so")
    record = json.loads(lib.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(lib.read_bytes()).hexdigest()
    # Replaced after the build: the recorded hash no longer matches -> rebuilt, never loaded.
    marker = tmp_path / "planted-ran"
    _plant(lib, marker)
    with pytest.warns(RuntimeWarning, match="SHA-256"):
        again = build()
    assert not marker.exists()
    _blur_agrees(again, monkeypatch)
    assert (
        json.loads(lib.with_suffix(".json").read_text())["sha256"]
        == hashlib.sha256(lib.read_bytes()).hexdigest()
    )


@pytest.mark.parametrize("how", ["world-writable", "symlink"])
def test_cache_folder_others_could_write_is_refused(fresh_build, tmp_path, monkeypatch, how):
    """A planted library with a matching record in a folder others control is never loaded:
    the kernels are built in a private temporary folder instead (and still work)."""
    cache, build = fresh_build
    cache.parent.mkdir(mode=0o700)
    planted = tmp_path / "theirs" if how == "symlink" else cache
    planted.mkdir(mode=0o700)
    if how == "symlink":
        cache.symlink_to(planted)
    else:
        planted.chmod(0o777)
    marker = tmp_path / "planted-ran"
    key = hashlib.sha256(
        "\0".join(
            [cpu_kernels._SOURCE, cpu_kernels._compiler(), "-O1", cpu_kernels._cpu_tag()]
        ).encode()
    ).hexdigest()[:20]
    lib = planted / f"augment-{key}.so"
    _plant(lib, marker)  # where the kernel library would be, with a record that matches it
    sha = hashlib.sha256(lib.read_bytes()).hexdigest()
    lib.with_suffix(".json").write_text(json.dumps({"sha256": sha}))
    with pytest.warns(RuntimeWarning, match="not using the cache folder"):
        out = build()
    assert not marker.exists()
    _blur_agrees(out, monkeypatch)
    assert "temporary" in cpu_kernels.REASON or "maskbank-kernels-" in cpu_kernels.REASON
    assert lib.read_bytes() and hashlib.sha256(lib.read_bytes()).hexdigest() == sha  # untouched
