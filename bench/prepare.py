"""Benchmark: per-scan prepare time against nnU-Net's resampling recipe and the I/O floor.

For each input (the real chest CT in ../shared/data when present, and a
synthetic 512x512x300 CT) it measures, in this process:

* floor      -- reading and decompressing the input file, nothing else: nibabel's
                ``np.asarray(img.dataobj)`` (the target's reference), and for
                context the bare file read + ``zlib.decompress`` and + ISA-L
                (what maskbank's reader uses);
* maskbank   -- the whole prepare (read, RAS, resample, body crop, normalise)
                plus writing the scan into a fresh bank;
* nnunet     -- read plus nnU-Net's default resampling recipe (cubic spline
                in-plane, nearest out-of-plane when spacing is anisotropic > 3,
                cubic everywhere otherwise), re-implemented here;

and prints ratios, ringing (overshoot beyond the input's intensity range) and
bank bytes per input voxel.  Usage: python bench/prepare.py [--json] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from skimage.transform import resize

from maskbank.bank import Bank
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.orient import to_ras
from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.prepare import prepare_scan
from maskbank.pipeline.resample import resample

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TARGET = (1.5, 1.5, 1.5)


def nnunet_resample(data: np.ndarray, spacing, target) -> np.ndarray:
    """nnU-Net v2's default image resampling, rebuilt from its documented behaviour."""
    spacing, target = np.asarray(spacing, float), np.asarray(target, float)
    new_shape = np.round(np.asarray(data.shape) * spacing / target).astype(int)
    if spacing.max() / spacing.min() > 3:
        axis = int(np.argmax(spacing))
        moved = np.moveaxis(data, axis, 0)
        plane = tuple(np.delete(new_shape, axis))
        slices = np.stack(
            [resize(s, plane, order=3, mode="edge", anti_aliasing=False) for s in moved]
        )
        rows = np.linspace(0, slices.shape[0] - 1, new_shape[axis])
        idx = np.round(rows).astype(int)  # order 0 across slices
        return np.moveaxis(slices[idx], 0, axis)
    return resize(data, tuple(new_shape), order=3, mode="edge", anti_aliasing=False)


def _timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _floor(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _floor_zlib(path: Path) -> bytes:
    return (
        zlib.decompress(path.read_bytes(), 31) if str(path).endswith(".gz") else path.read_bytes()
    )


def _floor_isal(path: Path) -> bytes:
    from isal import igzip

    return igzip.decompress(path.read_bytes()) if str(path).endswith(".gz") else path.read_bytes()


def bench_one(name: str, path: Path, repeat: int, workdir: Path) -> dict:
    t_floor, raw = _timed(lambda: _floor(path), repeat)
    t_zlib, _ = _timed(lambda: _floor_zlib(path), repeat)
    t_isal, _ = _timed(lambda: _floor_isal(path), repeat)
    img = nib.load(path)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])

    bank = Bank.create(workdir / f"bank-{name}")

    def run_maskbank():
        prep = prepare_scan(path, config=PrepareConfig())
        bank.write_scan(name, prep.arrays(), prep.attrs)
        return prep

    c0 = time.process_time()
    t_ours, prep = _timed(run_maskbank, repeat)
    cpu_ours = (time.process_time() - c0) / repeat  # all threads (torch, zarr, hashing)

    def run_nnunet():
        data, aff = to_ras(np.asarray(nib.load(path).dataobj, dtype=np.float32), img.affine)
        return nnunet_resample(data, np.linalg.norm(aff[:3, :3], axis=0), TARGET)

    t_nnunet, nn_out = _timed(run_nnunet, max(1, repeat - 1))
    data, aff = to_ras(np.asarray(raw, dtype=np.float32), img.affine)
    t_rs_ours, ours_out = _timed(lambda: resample(data, aff, TARGET)[0], repeat)
    lo, hi = float(data.min()), float(data.max())

    def overshoot(a: np.ndarray) -> float:
        return float(max(0.0, lo - a.min(), a.max() - hi))

    # Ringing next to edges: how far the resampled image leaves the local input range (3x3x3 neighbourhood).
    scan = bank.scan(name)
    nbytes = bank.row(name)["nbytes"]
    return {
        "scan": name,
        "input_shape": list(raw.shape),
        "input_spacing": [round(s, 3) for s in spacing],
        "output_shape": list(prep.image.shape),
        "floor_s": round(t_floor, 3),
        "floor_zlib_s": round(t_zlib, 3),
        "floor_isal_s": round(t_isal, 3),
        "maskbank_s": round(t_ours, 3),
        "maskbank_over_floor": round(t_ours / t_floor, 2),
        "maskbank_over_zlib_floor": round(t_ours / t_zlib, 2),
        "maskbank_cpu_s": round(cpu_ours, 3),
        "maskbank_cpu_over_floor": round(cpu_ours / t_floor, 2),
        "torch_threads": torch.get_num_threads(),
        "nnunet_read_resample_s": round(t_nnunet, 3),
        "nnunet_over_maskbank": round(t_nnunet / t_ours, 2),
        "resample_only_s": round(t_rs_ours, 3),
        "overshoot_maskbank": round(overshoot(ours_out), 1),
        "overshoot_nnunet": round(overshoot(nn_out), 1),
        "stage_s": prep.attrs["timings_s"],
        "bank_bytes": int(nbytes),
        "bank_bytes_per_input_voxel": round(nbytes / raw.size, 4),
        "bank_bytes_per_stored_voxel": round(nbytes / int(np.prod(scan.shape)), 4),
    }


def _sphere_truth(
    xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, centre, radius: float
) -> np.ndarray:
    """Area-averaged 1000 HU sphere on a 1.5 mm grid (4x4x4 supersampling of each output voxel)."""
    offs = (np.arange(4) + 0.5) / 4 * 1.5 - 0.75
    acc = np.zeros((len(xs), len(ys), len(zs)), np.float32)
    for ox in offs:
        for oy in offs:
            for oz in offs:
                d2 = (
                    (xs[:, None, None] + ox - centre[0]) ** 2
                    + (ys[None, :, None] + oy - centre[1]) ** 2
                    + (zs[None, None, :] + oz - centre[2]) ** 2
                )
                acc += d2 < radius**2
    return acc * (1000.0 / 64)


def ringing_test() -> dict:
    """Resample a noise-free 1000 HU sphere in water (0.7x0.7x5 mm -> 1.5 mm).

    Reports the overshoot beyond [0, 1000] and the RMSE against the exact
    area-averaged sphere on each method's own output grid (blur + aliasing + ringing).
    """
    shape, sp, radius = (200, 200, 30), (0.7, 0.7, 5.0), 40.0
    centre = (100 * 0.7, 100 * 0.7, 15 * 5.0)
    idx = np.indices(shape, dtype=np.float32)
    r2 = sum(((idx[a] * sp[a]) - centre[a]) ** 2 for a in range(3))
    data = np.where(r2 < radius**2, 1000.0, 0.0).astype(np.float32)
    ours, ours_aff = resample(data, np.diag([*sp, 1.0]), TARGET)
    nn = nnunet_resample(data, sp, TARGET)
    ours_grid = [ours_aff[a, 3] + np.arange(n) * ours_aff[a, a] for a, n in enumerate(ours.shape)]
    nn_grid = [
        ((np.arange(m) + 0.5) * n / m - 0.5) * sp[a]
        for a, (n, m) in enumerate(zip(shape[:2], nn.shape[:2], strict=True))
    ]
    nn_grid.append(
        np.linspace(0, shape[2] - 1, nn.shape[2]) * sp[2]
    )  # where its voxels claim to be
    out = {}
    for name, img, grid in (("maskbank", ours, ours_grid), ("nnunet", nn, nn_grid)):
        truth = _sphere_truth(*grid, centre, radius)
        out[f"overshoot_hu_{name}"] = round(float(max(0.0, -img.min(), img.max() - 1000.0)), 2)
        out[f"rmse_hu_{name}"] = round(float(np.sqrt(np.mean((img - truth) ** 2))), 2)
    return out


def _synthetic(workdir: Path) -> Path:
    ph = make_phantom("ct", (512, 512, 300), spacing=(0.7, 0.7, 1.0), seed=0)
    return ph.save_nifti(workdir, "synthetic_ct_512x512x300")[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--json", action="store_true", help="print one JSON document instead of a table"
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs per measurement (median is reported)"
    )
    ap.add_argument("--skip-synthetic", action="store_true", help="only the real chest CT")
    ap.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = []
        if (SHARED / "ct_chest_lung1.nii.gz").exists():
            inputs.append(("chest_ct_512x512x48", SHARED / "ct_chest_lung1.nii.gz"))
        if not args.skip_synthetic:
            inputs.append(("synthetic_ct_512x512x300", _synthetic(work)))
        for name, path in inputs:
            results.append(bench_one(name, path, args.repeat, work))
    ringing = ringing_test()
    if args.record:
        from record import record

        for r in results:
            keys = ("maskbank_s", "maskbank_over_floor", "nnunet_over_maskbank")
            record("Prepare", {"scan": r["scan"], **{k: r[k] for k in keys}})
    if args.json:
        print(json.dumps({"scans": results, "ringing": ringing}, indent=2))
        return 0
    for r in results:
        print(
            f"\n== {r['scan']}  {r['input_shape']} @ {r['input_spacing']} mm -> {r['output_shape']} @ 1.5 mm"
        )
        print(f"  floor (read + decompress)     {r['floor_s']:8.3f} s   (nibabel)")
        print(
            f"    bare read + zlib / + ISA-L  {r['floor_zlib_s']:8.3f} s / {r['floor_isal_s']:.3f} s"
        )
        print(
            f"  maskbank prepare + bank write {r['maskbank_s']:8.3f} s   = {r['maskbank_over_floor']:.2f}x floor"
            f" ({r['maskbank_over_zlib_floor']:.2f}x the zlib floor)"
        )
        print(
            f"    CPU time, all threads       {r['maskbank_cpu_s']:8.3f} s   = {r['maskbank_cpu_over_floor']:.2f}x floor"
            f" (torch threads: {r['torch_threads']})"
        )
        print(
            f"  nnU-Net read + resample       {r['nnunet_read_resample_s']:8.3f} s   = {r['nnunet_over_maskbank']:.2f}x maskbank"
        )
        print(f"  stages: {r['stage_s']}")
        print(
            f"  overshoot beyond input range: maskbank {r['overshoot_maskbank']}  nnU-Net {r['overshoot_nnunet']}"
        )
        print(f"  bank bytes per input voxel    {r['bank_bytes_per_input_voxel']}")
    print(f"\n== ringing on a sharp 1000 HU sphere (0.7x0.7x5 mm -> 1.5 mm): overshoot {ringing}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
