"""How fast is a random 128^3 crop from the bank, against a .nii.gz and a raw .npy memmap?

Also bytes on disk per voxel, and (with --codecs / --chunks) the codec and chunk-size
comparisons recorded in docs/bank-format.md.

    .venv/bin/python bench/bank_read.py                     # 512x512x300 synthetic CT
    .venv/bin/python bench/bank_read.py --shape 256 256 200 --json
    .venv/bin/python bench/bank_read.py --real ../shared/data/ct_head_template_1mm.nii.gz --codecs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from maskbank.bank import Bank  # noqa: E402
from maskbank.bank.index import dir_nbytes  # noqa: E402
from maskbank.bank.writing import Encoding  # noqa: E402

CROP = 128
CT_CLIP = (-991.0, 500.0)


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """CT-like HU volume: air, an elliptic body of soft tissue, lungs, bone, smooth + noisy."""
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    x, y, z = ((g - n / 2) / (n / 2) for g, n in zip(grids, shape, strict=True))
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = (x / 0.85) ** 2 + (y / 0.6) ** 2 < 1.0
    body = np.broadcast_to(body, shape)
    hu[body] = 40.0
    lungs = (((np.abs(x) - 0.4) / 0.25) ** 2 + (y / 0.35) ** 2 < 1.0) & (z > -0.6)
    hu[np.broadcast_to(lungs, shape) & body] = -820.0
    spine = ((x / 0.08) ** 2 + ((y + 0.45) / 0.08) ** 2 < 1.0) & np.ones_like(z, dtype=bool)
    hu[np.broadcast_to(spine, shape)] = 700.0
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0) * 60.0
    hu += texture + rng.standard_normal(shape).astype(np.float32) * 15.0
    return hu


def zscore_f16(hu: np.ndarray) -> np.ndarray:
    """The pipeline's CT normalisation: clip to a HU window, z-score, store as float16."""
    clipped = np.clip(hu, *CT_CLIP)
    return ((clipped - clipped.mean()) / clipped.std()).astype(np.float16)


def random_crops(shape: tuple[int, ...], n: int, seed: int = 1) -> list[tuple[slice, ...]]:
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        start = [int(rng.integers(0, max(1, s - CROP + 1))) for s in shape]
        crops.append(tuple(slice(a, a + min(CROP, s)) for a, s in zip(start, shape, strict=True)))
    return crops


def timed(fn, reps: int) -> float:
    """Median wall time of fn(i) over reps calls, seconds."""
    times = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def chunks_touched(crop: tuple[slice, ...], chunk: int) -> int:
    return math.prod((s.stop - 1) // chunk - s.start // chunk + 1 for s in crop)


def write_bank(root: Path, image: np.ndarray, encoding: Encoding) -> tuple[Bank, float]:
    bank = Bank.create(root, encoding=encoding)
    attrs = {
        "dataset": "bench",
        "modality": "ct",
        "spacing": [1.0, 1.0, 1.0],
        "source_path": "synthetic",
        "source_sha256": "-",
        "fingerprint": "-",
    }
    t = time.perf_counter()
    bank.write_scan("vol", {"image": image}, attrs)
    return bank, time.perf_counter() - t


def compare_formats(
    image: np.ndarray, hu: np.ndarray, tmp: Path, crops_n: int, nii_reps: int
) -> dict:
    """Bank (float16) vs .npy memmap (float16) vs .nii.gz (int16 HU, as scans usually arrive)."""
    crops = random_crops(image.shape, crops_n)
    voxels = image.size
    bank, write_s = write_bank(tmp / "bank", image, Encoding())
    scan = Bank.open(tmp / "bank").scan("vol")
    arr = scan.array("image")
    bank_s = timed(lambda i: scan.read("image", crops[i % len(crops)]), crops_n)
    cold_bank_s = timed(
        lambda i: Bank.open(tmp / "bank").scan("vol").read("image", crops[i % len(crops)]),
        max(3, crops_n // 4),
    )
    npy = tmp / "vol.npy"
    np.save(npy, image)
    mm = np.load(npy, mmap_mode="r")
    npy_s = timed(lambda i: np.array(mm[crops[i % len(crops)]]), crops_n)
    nii = tmp / "vol.nii.gz"
    t = time.perf_counter()
    nib.save(nib.Nifti1Image(np.round(hu).astype(np.int16), np.eye(4)), nii)
    nii_write_s = time.perf_counter() - t
    nii_s = timed(
        lambda i: np.asarray(nib.load(nii).dataobj)[crops[i % len(crops)]].copy(), nii_reps
    )
    image_bytes = dir_nbytes(Path(bank.location) / "scans" / "vol" / "image")
    return {
        "shape": list(image.shape),
        "dtype": str(image.dtype),
        "crop": CROP,
        "chunks": list(arr.chunks),
        "shards": list(arr.shards or []),
        "mean_chunks_touched": statistics.mean(chunks_touched(c, arr.chunks[0]) for c in crops),
        "bank_crop_ms": bank_s * 1e3,
        "bank_crop_reopen_ms": cold_bank_s * 1e3,
        "npy_memmap_crop_ms": npy_s * 1e3,
        "nii_gz_crop_ms": nii_s * 1e3,
        "nii_gz_over_bank": nii_s / bank_s,
        "bank_over_npy": bank_s / npy_s,
        "bank_write_s": write_s,
        "nii_gz_write_s": nii_write_s,
        "bank_bytes_per_voxel": image_bytes / voxels,
        "nii_gz_bytes_per_voxel": nii.stat().st_size / voxels,
        "npy_bytes_per_voxel": npy.stat().st_size / voxels,
    }


def compare_codecs(image: np.ndarray, tmp: Path, crops_n: int) -> list[dict]:
    crops = random_crops(image.shape, crops_n, seed=2)
    rows = []
    settings = [
        ("zstd", lvl, sh) for sh in ("noshuffle", "shuffle", "bitshuffle") for lvl in (1, 3, 5)
    ]
    settings += [("zstd", 9, "bitshuffle"), ("lz4", 5, "bitshuffle"), ("lz4", 5, "shuffle")]
    for cname, clevel, shuffle in settings:
        enc = Encoding(cname=cname, clevel=clevel, shuffle=shuffle)
        root = tmp / f"codec-{cname}-{clevel}-{shuffle}"
        _, write_s = write_bank(root, image, enc)
        scan = Bank.open(root).scan("vol")
        read_s = timed(lambda i, s=scan: s.read("image", crops[i % len(crops)]), crops_n)
        nbytes = dir_nbytes(root / "scans" / "vol" / "image")
        rows.append(
            {
                "codec": f"blosc-{cname} clevel={clevel} {shuffle}",
                "ratio": image.nbytes / nbytes,
                "bytes_per_voxel": nbytes / image.size,
                "write_s": write_s,
                "crop_ms": read_s * 1e3,
            }
        )
    return rows


def compare_chunks(image: np.ndarray, tmp: Path, crops_n: int) -> list[dict]:
    crops = random_crops(image.shape, crops_n, seed=3)
    rows = []
    for chunk, shard in ((32, 256), (64, 256), (64, 512), (128, 512)):
        root = tmp / f"chunk-{chunk}-{shard}"
        _, write_s = write_bank(root, image, Encoding(chunk=chunk, max_shard=shard))
        scan = Bank.open(root).scan("vol")
        read_s = timed(lambda i, s=scan: s.read("image", crops[i % len(crops)]), crops_n)
        image_dir = root / "scans" / "vol" / "image"
        rows.append(
            {
                "chunk": chunk,
                "max_shard": shard,
                "files": sum(1 for p in image_dir.rglob("*") if p.is_file()),
                "mean_chunks_touched": statistics.mean(chunks_touched(c, chunk) for c in crops),
                "bytes_per_voxel": dir_nbytes(image_dir) / image.size,
                "write_s": write_s,
                "crop_ms": read_s * 1e3,
            }
        )
    return rows


def index_scale(n_rows: int, tmp: Path) -> dict:
    """Cost of the bank-level index with n_rows scans: size, open, summary, one row update."""
    from maskbank.bank.index import atomic_write_text, render_index

    root = tmp / "index-bank"
    bank, _ = write_bank(root, np.zeros((32, 32, 32), np.float16), Encoding())
    template = bank.row("vol")
    rows = {f"scan-{i:06d}": {**template, "scan_id": f"scan-{i:06d}"} for i in range(n_rows)}
    rows["vol"] = template
    atomic_write_text(root / "index.json", render_index(rows))
    t = time.perf_counter()
    opened = Bank.open(root)
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    opened.summary()
    summary_s = time.perf_counter() - t
    writer = Bank.open(root, mode="a")
    image = np.ones((32, 32, 32), np.float16)
    t = time.perf_counter()
    writer.write_scan(
        "vol",
        {"image": image},
        {
            k: template[k]
            for k in (
                "dataset",
                "modality",
                "spacing",
                "source_path",
                "source_sha256",
                "fingerprint",
            )
        },
    )
    write_s = time.perf_counter() - t
    assert len(writer) == n_rows + 1
    return {
        "rows": n_rows + 1,
        "index_bytes": (root / "index.json").stat().st_size,
        "open_s": open_s,
        "summary_s": summary_s,
        "write_small_scan_with_index_update_s": write_s,
    }


def load_real(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument(
        "--real", type=Path, help="a CT .nii.gz to use instead of a synthetic volume"
    )
    parser.add_argument("--crops", type=int, default=20, help="random crops timed per reader")
    parser.add_argument("--nii-reps", type=int, default=3, help="full .nii.gz decodes timed")
    parser.add_argument("--codecs", action="store_true", help="also compare Blosc settings")
    parser.add_argument("--chunks", action="store_true", help="also compare chunk/shard sizes")
    parser.add_argument("--index-rows", type=int, default=0, help="also time a big index")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    hu = load_real(args.real) if args.real else synthetic_ct(tuple(args.shape))
    image = zscore_f16(hu)
    result: dict = {"source": str(args.real) if args.real else "synthetic CT"}
    with tempfile.TemporaryDirectory(prefix="bank-bench-") as tmp:
        result["formats"] = compare_formats(image, hu, Path(tmp), args.crops, args.nii_reps)
        if args.codecs:
            result["codecs"] = compare_codecs(image, Path(tmp), args.crops)
        if args.chunks:
            result["chunk_sizes"] = compare_chunks(image, Path(tmp), args.crops)
        if args.index_rows:
            result["index"] = index_scale(args.index_rows, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    f = result["formats"]
    print(f"{result['source']} {f['shape']} {f['dtype']}, random {CROP}^3 crops (median):")
    print(
        f"  bank   {f['bank_crop_ms']:8.1f} ms  ({f['bank_crop_reopen_ms']:.1f} ms reopening the bank each time)"
    )
    print(f"  npy    {f['npy_memmap_crop_ms']:8.1f} ms  (uncompressed memmap, page cache warm)")
    print(f"  nii.gz {f['nii_gz_crop_ms']:8.1f} ms  (int16 HU; nibabel full decode + slice)")
    print(
        f"  nii.gz / bank = {f['nii_gz_over_bank']:.1f}x   bank / npy = {f['bank_over_npy']:.1f}x"
    )
    print(
        f"  bytes per voxel: bank {f['bank_bytes_per_voxel']:.3f}, nii.gz "
        f"{f['nii_gz_bytes_per_voxel']:.3f}, npy {f['npy_bytes_per_voxel']:.3f}"
    )
    for row in result.get("codecs", []):
        print(
            f"  {row['codec']:38s} ratio {row['ratio']:5.2f}  {row['bytes_per_voxel']:.3f} B/vox  "
            f"write {row['write_s']:5.2f} s  crop {row['crop_ms']:6.1f} ms"
        )
    for row in result.get("chunk_sizes", []):
        print(
            f"  chunk {row['chunk']:3d} shard<={row['max_shard']}: {row['files']} files, "
            f"{row['mean_chunks_touched']:.1f} chunks/crop, {row['bytes_per_voxel']:.3f} B/vox, "
            f"write {row['write_s']:.2f} s, crop {row['crop_ms']:.1f} ms"
        )
    if "index" in result:
        ix = result["index"]
        print(
            f"  index of {ix['rows']} scans: {ix['index_bytes'] / 1e6:.1f} MB, open "
            f"{ix['open_s'] * 1e3:.0f} ms, summary {ix['summary_s'] * 1e3:.0f} ms, writing a "
            f"32^3 scan incl. index update {ix['write_small_scan_with_index_update_s'] * 1e3:.0f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
