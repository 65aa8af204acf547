"""Pairs per second per worker of the bank sampler vs the published data path.

    python bench/sampler.py [--bank BANK] [--pairs 8] [--json]

Ours: ``train.pair_sampler.PairStream`` (reads only the chunks a crop touches,
rebuilds only the K masks, bit-packed), then ``PairAugmenter`` on the CPU.

Baseline, rebuilt here on the same scans, crops and masks: the published
implementation's data path -- each scan's image a whole-volume ``.npy``
memory-mapped, each mask a whole uint8 volume in HDF5 with LZF, the K masks of a
pair decoded whole and cropped, then CPU augmentation that warps the image and
every mask channel separately (trilinear + threshold).

Both run in this one process with one intra-op thread, so the figures are per
worker / per core, and in alternating rounds (a block of our pairs, then one
baseline pair) so that a shared machine's drift slows both alike; ``ratio_rounds``
gives the per-round spread. ``--huge-bank`` forgets every open scan and cached chunk
at the start of each scan visit (each pair unless ``--pairs-per-visit``), as on a bank
of thousands of scans, where nearly every visit is to a scan the worker has not seen.
Without --bank a phantom bank of realistic size is built in a temporary directory
(takes a minute or two).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maskbank.train.augment import STRONG, WEAK, PairAugmenter  # noqa: E402
from maskbank.train.augment.spatial import random_affine, sampling_grid  # noqa: E402
from maskbank.train.crop_placement import padded_roi  # noqa: E402
from maskbank.train.memory_policy import retain_freed_memory  # noqa: E402
from maskbank.train.pair_sampler import PairStream, SamplerError  # noqa: E402
from maskbank.train.run_config import DataConfig  # noqa: E402

REALISTIC_SOURCE = (512, 512, 300)  # voxels of bench/prepare.py's synthetic CT, before prepare
REALISTIC_SPACING = (0.7, 0.7, 1.0)  # mm
REALISTIC_VERSION = 1  # bump when the recipe changes: a cached bank of another one is rebuilt


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "maskbank" / "bench-sampler-realistic"


def realistic_bank(
    cache: Path, n_scans: int = 2, source: tuple[int, int, int] = REALISTIC_SOURCE
) -> tuple[str, list[dict]]:
    """Bank of ``n_scans`` synthetic CTs (``source`` voxels, default 512x512x300, at 0.7x0.7x1
    mm) through the normal path.

    Each is written as a ``.nii.gz`` (int16 HU, as scanners store it), prepared by
    ``pipeline.prepare.prepare_scan`` (RAS, 1.5 mm, body crop, normalisation), written with
    ``Bank.write_scan`` and given proposals by ``flows.propose.propose_scan`` with the default
    ``ProposalConfig`` -- what ``maskbank prepare`` + ``maskbank propose`` do per scan.
    Reused from ``cache`` when a complete bank of this recipe is there (built once: minutes).
    Returns the bank path and per scan its source and bank shapes.
    """
    from maskbank.bank import Bank

    path = cache / "bank"
    stamp = cache / "recipe.json"
    recipe = {
        "version": REALISTIC_VERSION,
        "source": list(source),  # lists: compared with the JSON stamp
        "spacing": list(REALISTIC_SPACING),
        "scans": n_scans,
    }
    if stamp.exists() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return str(path), json.loads(stamp.read_text())["volumes"]
    import shutil

    from maskbank.flows.propose import propose_scan
    from maskbank.pipeline.config import PrepareConfig
    from maskbank.pipeline.phantom import make_phantom
    from maskbank.pipeline.prepare import prepare_scan
    from maskbank.pipeline.proposals.engine import ProposalConfig

    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    bank = Bank.create(path)
    volumes = []
    for seed in range(n_scans):
        t = time.perf_counter()
        name = f"synthetic-ct-{seed}"
        ph = make_phantom("ct", tuple(source), spacing=REALISTIC_SPACING, seed=seed)
        nifti = ph.save_nifti(cache / "nifti", name)[0]
        del ph
        prep = prepare_scan(nifti, config=PrepareConfig(), dataset="synthetic")
        bank.write_scan(name, prep.arrays(), prep.attrs)
        shape = list(prep.arrays()["image"].shape)
        del prep
        rec = propose_scan(bank, name, ProposalConfig())
        volumes.append(
            {
                "scan_id": name,
                "source_shape": list(source),
                "bank_shape": shape,
                "proposals": rec["n_proposals"],
            }
        )
        print(
            f"realistic bank: {name} {tuple(source)} -> {shape}, {rec['n_proposals']} "
            f"proposals, {time.perf_counter() - t:.0f} s",
            file=sys.stderr,
        )
        (cache / "nifti" / nifti.name).unlink()
    stamp.write_text(json.dumps({"recipe": recipe, "volumes": volumes}))
    return str(path), volumes


def build_baseline_files(
    bank_path: str, stream: PairStream, samples: list[dict], root: Path
) -> float:
    """Whole-volume .npy images + one HDF5 (LZF) of whole uint8 masks per scan; returns seconds."""
    import h5py

    from maskbank.bank import Bank
    from maskbank.bank.sampling import ProposalReader

    t0 = time.perf_counter()
    bank = Bank.open(bank_path)
    needed: dict[str, set[int]] = {}
    for s in samples:
        sid = stream.scan_ids[s["scan_index"]]
        needed.setdefault(sid, set()).update(int(i) for i in s["proposal_ids"])
    for sid, ids in needed.items():
        scan = bank.scan(sid)
        np.save(root / f"{sid}.npy", scan.read("image").astype(np.float32))
        reader = ProposalReader(scan)
        with h5py.File(root / f"{sid}.h5", "w") as fh:
            for i in sorted(ids):
                fh.create_dataset(
                    f"mask_{i}", data=reader.mask(i).astype(np.uint8), compression="lzf"
                )
    return time.perf_counter() - t0


def _crop(vol: np.ndarray, start: np.ndarray, size: int, fill: float) -> np.ndarray:
    src, dst = padded_roi(start, size, vol.shape)
    out = np.full((size,) * 3, fill, dtype=vol.dtype)
    out[dst] = vol[src]
    return out


def baseline_pair(root: Path, sid: str, sample: dict, size: int) -> dict[str, np.ndarray]:
    import h5py

    image = np.load(root / f"{sid}.npy", mmap_mode="r")
    out = {}
    with h5py.File(root / f"{sid}.h5", "r") as fh:
        masks = [fh[f"mask_{int(i)}"][...] for i in sample["proposal_ids"]]  # whole volumes
    for side in ("ref", "query"):
        start = sample[f"{side}_start"]
        img = _crop(image, start, size, 0.0)
        out[f"{side}_image"] = img.astype(np.float32)
        m = np.stack([_crop(mk, start, size, 0) for mk in masks] + [np.ones((size,) * 3, np.uint8)])
        out[f"{side}_masks"] = m
    return out


def baseline_augment(pair: dict[str, np.ndarray], crop: int, gen: torch.Generator) -> None:
    """Per-channel spatial transform of image and every mask (the published CPU path)."""
    for side, spec in (("ref", WEAK), ("query", STRONG)):
        img = torch.from_numpy(pair[f"{side}_image"])[None, None]
        masks = torch.from_numpy(pair[f"{side}_masks"])[None].float()
        mat = random_affine(1, spec, gen, "cpu")
        grid = sampling_grid(mat, tuple(img.shape[-3:]), crop)
        vol = torch.cat([img, masks], dim=1)
        warped = torch.nn.functional.grid_sample(vol, grid, mode="bilinear", align_corners=True)
        _ = warped[:, 1:] > 0.5


def forget_scans(stream: PairStream) -> None:
    """Drop the stream's open scans and decoded chunks: the next pair is a first visit."""
    stream._scans.clear()
    stream.chunks.clear()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", help="bank path/URL (default: build a phantom bank in a temp dir)")
    p.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="fsspec options for a --bank URL, e.g. an S3 endpoint (as MASKBANK_STORAGE_OPTIONS)",
    )
    p.add_argument(
        "--realistic",
        action="store_true",
        help="bank of 2 synthetic 512x512x300 CTs (0.7x0.7x1 mm) through prepare + propose, "
        "built once into --cache-dir (the baseline's cost grows with the volume, ours does not)",
    )
    p.add_argument(
        "--realistic-source",
        type=int,
        nargs=3,
        default=list(REALISTIC_SOURCE),
        help="voxels of each synthetic CT before prepare (a smaller one for smoke tests)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where --realistic keeps its bank (default: $XDG_CACHE_HOME or ~/.cache, "
        "then maskbank/bench-sampler-realistic)",
    )
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument(
        "--wide",
        action="store_true",
        help="float32 images / int32 bit fields from the sampler (the trainer reads them compact: "
        "float16 / int16, the same values)",
    )
    p.add_argument("--baseline-pairs", type=int, default=3)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--margin", type=int, default=16)
    p.add_argument("--k", type=int, default=13)
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 192])
    p.add_argument("--scans", type=int, default=2)
    p.add_argument(
        "--chunk-cache-mb",
        type=float,
        default=256,
        help="per-worker decoded-chunk cache (0 = every read decodes, as on a huge bank)",
    )
    p.add_argument(
        "--huge-bank",
        action="store_true",
        help="each scan visit (each pair unless --pairs-per-visit) re-opens its scan and decodes "
        "its chunks afresh, as a worker streaming from thousands of scans does",
    )
    p.add_argument(
        "--pairs-per-visit",
        type=int,
        default=1,
        help="data.pairs_per_scan_visit: consecutive pairs drawn from one scan (1 = default stream)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.storage_options is not None:  # every Bank.open of this process reads it
        os.environ["MASKBANK_STORAGE_OPTIONS"] = args.storage_options
    torch.set_num_threads(1)
    # As in a DataLoader worker and the trainer (``make_loader``, ``train.run``): freed
    # buffers stay in the heap. Process-wide, so the baseline below gets it too.
    retain_freed_memory()

    with tempfile.TemporaryDirectory(prefix="maskbank-bench-") as tmp:
        tmp_path = Path(tmp)
        bank = args.bank
        volumes = None
        if args.realistic:
            if bank is not None:
                p.error("--realistic builds its own bank: give either --bank or --realistic")
            bank, volumes = realistic_bank(
                args.cache_dir or default_cache_dir(), source=tuple(args.realistic_source)
            )
        elif bank is None:
            from maskbank.flows.demo_bank import build_phantom_bank

            bank = str(tmp_path / "bank")
            t = time.perf_counter()
            build_phantom_bank(bank, n_scans=args.scans, shape=tuple(args.shape))
            print(
                f"built phantom bank {args.shape} x{args.scans} in {time.perf_counter() - t:.0f} s",
                file=sys.stderr,
            )
        cfg = DataConfig(
            crop=args.crop,
            margin=args.margin,
            k=args.k,
            batch_size=1,
            pairs_per_scan_visit=args.pairs_per_visit,
        )
        try:
            stream = PairStream(
                bank,
                cfg,
                seed=0,
                chunk_cache_mb=args.chunk_cache_mb,
                compact=not args.wide,
            )
        except SamplerError as exc:  # a missing bank, too few proposals: say what to do
            print(f"error: {exc}", file=sys.stderr)
            return 2
        warm = stream.sample(10_000)  # open stores, warm caches (as a long-running worker would be)
        stream.chunks.clear()  # ... but no decoded chunks: pair 0 starts cold
        stream.chunks.hits = stream.chunks.misses = 0
        size = cfg.read_size
        gen = torch.Generator().manual_seed(0)
        aug = PairAugmenter(cfg.crop)
        # First torch/numpy calls pay one-time setup (~0.5 s here): warm up on the warm-up pair
        # with its own generator, as a running worker is (the baseline shares this process).
        warm_batch = {
            k: torch.from_numpy(warm[k])[None, None]
            for k in ("ref_image", "query_image", "ref_bits", "query_bits")
        }
        aug(warm_batch, cfg.n_tasks, torch.Generator().manual_seed(1))

        crops = ("ref_image", "query_image", "ref_bits", "query_bits")
        keep_crops = torch.cuda.is_available()  # the GPU pass below re-augments them
        nb = max(1, min(args.baseline_pairs, args.pairs))
        # The baseline's files hold what its first nb pairs need (scan, boxes, proposal ids):
        # drawn and written before any timing; then ours starts from cold chunks again.
        base_root = tmp_path / "baseline"
        base_root.mkdir()
        base_samples = [
            {k: v for k, v in stream.sample(i).items() if k not in crops} for i in range(nb)
        ]
        build_s = build_baseline_files(bank, stream, base_samples, base_root)
        stream.chunks.clear()
        stream.chunks.hits = stream.chunks.misses = 0
        # Rounds: ours on a block of pairs, then the baseline on one pair. On a shared machine
        # speed drifts by +-20 % over a minute; alternating exposes both sides to the same drift
        # (run one after the other, the ratio of one run ranged 33-53x on the same code).
        blocks = np.array_split(np.arange(args.pairs), nb)
        bgen = torch.Generator().manual_seed(1)
        samples, t_read, t_aug = [], 0.0, 0.0
        t_base_read = t_base_aug = cpu_ours = cpu_base = 0.0
        rounds = []
        for r, block in enumerate(blocks):
            c0, t_block = time.process_time(), time.perf_counter()
            for i in block.tolist():
                t = time.perf_counter()
                if args.huge_bank and i % max(args.pairs_per_visit, 1) == 0:
                    forget_scans(stream)  # timed: re-opening is part of a new visit's cost
                s = stream.sample(i)
                t_read += time.perf_counter() - t
                # Keeping every pair's 64 MB of crops (as a worker never does) would make each
                # later allocation fault in fresh pages (~40% more per pair than in a worker).
                samples.append(s if keep_crops else {k: v for k, v in s.items() if k not in crops})
                batch = {k: torch.from_numpy(s[k])[None, None] for k in crops}
                t = time.perf_counter()
                aug(batch, cfg.n_tasks, gen)
                t_aug += time.perf_counter() - t
            ours_pair = (time.perf_counter() - t_block) / max(len(block), 1)
            c1 = time.process_time()
            cpu_ours += c1 - c0
            s = base_samples[r]
            sid = stream.scan_ids[s["scan_index"]]
            t0 = time.perf_counter()
            pair = baseline_pair(base_root, sid, s, size)
            t1 = time.perf_counter()
            baseline_augment(pair, cfg.crop, bgen)
            t2 = time.perf_counter()
            del pair
            t_base_read += t1 - t0
            t_base_aug += t2 - t1
            cpu_base += time.process_time() - c1
            rounds.append((t2 - t0) / ours_pair)
        ours_read = args.pairs / t_read
        ours_cpu = args.pairs / (t_read + t_aug)

        gpu = None
        if torch.cuda.is_available():  # read on this CPU worker, augment on the GPU
            dev = torch.device("cuda")
            ggen = torch.Generator(device=dev).manual_seed(0)
            t_gpu = 0.0
            for s in samples:
                batch = {k: torch.from_numpy(s[k])[None, None].to(dev) for k in crops}
                t = time.perf_counter()
                aug(batch, cfg.n_tasks, ggen)
                torch.cuda.synchronize()
                t_gpu += time.perf_counter() - t
            gpu = args.pairs / (t_read + t_gpu)
        base = nb / (t_base_read + t_base_aug)
        shapes = sorted({tuple(stream._open(sid)[0].shape) for sid in stream.scan_ids})
        result = {
            "pairs_per_s": ours_cpu,
            "compact": not args.wide,
            "baseline_pairs_per_s": base,
            "ratio": ours_cpu / base,
            "read_only_pairs_per_s": ours_read,
            # Per CPU-second of this process (all its threads): leaves out time spent waiting
            # for a core on a shared machine, not slowdowns from shared caches/memory.
            "pairs_per_cpu_s": args.pairs / cpu_ours,
            "baseline_pairs_per_cpu_s": nb / cpu_base,
            "ratio_cpu": (args.pairs / cpu_ours) / (nb / cpu_base),
            # Per round (a block of our pairs, then one baseline pair): the spread is the
            # machine's drift plus the baseline pairs' differences (scan size, draws).
            "ratio_rounds": {
                "median": float(np.median(rounds)),
                "min": float(min(rounds)),
                "max": float(max(rounds)),
                "n": len(rounds),
            },
            "gpu_aug_pairs_per_s": gpu,
            "gpu_aug_ratio": None if gpu is None else gpu / base,
            "read_only_ratio_vs_baseline_read": (nb / t_base_read)
            and ours_read / (nb / t_base_read),
            "ours_s_per_pair": {"read": t_read / args.pairs, "augment_cpu": t_aug / args.pairs},
            "baseline_s_per_pair": {"read": t_base_read / nb, "augment_cpu": t_base_aug / nb},
            "baseline_build_s": build_s,
            "chunk_cache_mb": args.chunk_cache_mb,
            "chunk_cache_hit_rate": stream.chunks.hits
            / max(stream.chunks.hits + stream.chunks.misses, 1),
            "pairs_per_scan_visit": args.pairs_per_visit,
            "huge_bank": args.huge_bank,
            "crop": cfg.crop,
            "margin": cfg.margin,
            "k": cfg.k,
            "pairs": args.pairs,
            "baseline_pairs": nb,
            "scan_shapes": shapes,
            # Why ratios differ between banks: the baseline decodes K whole-volume masks per
            # pair (its cost grows with the scan), ours reads only the crops' chunks.
            "scan_voxels_mean": float(np.mean([np.prod(s) for s in shapes])),
            "source_shapes": None if volumes is None else [v["source_shape"] for v in volumes],
            "baseline_s_per_pair_total": (t_base_read + t_base_aug) / nb,
            "ours_s_per_pair_total": (t_read + t_aug) / args.pairs,
            "bank": "realistic" if volumes is not None else (args.bank or "phantom"),
            "threads": torch.get_num_threads(),
            "note": "pairs_per_s includes our CPU augmentation; with GPU augmentation a worker only reads "
            "(read_only_pairs_per_s); baseline includes its CPU augmentation",
        }
    print(
        f"volumes {shapes} (mean {result['scan_voxels_mean'] / 1e6:.1f} M voxels"
        + (f", from {result['source_shapes']}" if volumes is not None else "")
        + f"): baseline {result['baseline_s_per_pair_total']:.2f} s/pair, ours "
        f"{result['ours_s_per_pair_total'] * 1e3:.0f} ms/pair, ratio {result['ratio']:.1f}x",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:36s} {value}")
    if args.record:
        from record import record

        keys = (
            "bank",
            "ratio",
            "ours_s_per_pair",
            "baseline_s_per_pair_total",
            "read_only_pairs_per_s",
        )
        record("Sampler", {k: result[k] for k in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())
