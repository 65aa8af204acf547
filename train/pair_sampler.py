"""Stream reference/query pairs with K proposal masks out of a bank.

Design choices (why):

* **Deterministic stream.** Sample ``i`` of a run is a pure function of
  ``(seed, i)``; it does not depend on which process draws it. Rank ``r`` of
  ``W`` takes global batch ``b * W + r`` as its ``b``-th batch, and DataLoader
  worker ``w`` of ``n`` produces local batches ``b = start + w, start + w + n, ...``
  (the DataLoader pulls from workers round-robin, so batches arrive in order).
  Workers and ranks therefore cover the stream without duplicates, and a resumed
  run only needs the number of batches already consumed (``start_batch``) to
  continue exactly where it stopped, whatever its worker count.
* **Batches are built in the workers** (the dataset yields whole batches) so
  that the main process only pins and copies.
* **Read only what a crop touches.** Image crops and the proposal layers are
  built from the touched chunks only, decoded straight from the bank's shards
  (``bank.chunk_reader.ShardedBloscReader``; other layouts through ``ScanView.read``).
  Candidates' layers are read in the reference crop (their counts), the chosen
  ones in the union of both boxes; the K masks are rebuilt chunk piece by chunk
  piece by one table lookup per layer (``train.crop_masks``) and travel as one
  int32 bit field per crop (bit k = task k), 1/K of the bytes of K boolean volumes.
* **Decode each chunk once per worker.** Reads go through a per-process LRU of
  decoded chunks (``train.crop_masks.ChunkCache``, ``chunk_cache_mb``), so pairs
  whose boxes overlap an earlier pair's (same scan) skip decompression. With
  ``pairs_per_scan_visit = P > 1`` the scan of pair ``i`` is drawn from
  ``(seed, i // P)``: P consecutive pairs share a scan (different anchors, crops
  and proposals), which turns most reads into cache hits on large banks too, at
  the price of less scan diversity within a batch. P = 1 (default) is the
  original stream, pair for pair.
* **Lazy, per-process store handles.** The bank is opened on first use inside
  each worker, never pickled across a fork.
* This module imports numpy, torch and ``bank`` only: no Prefect, no Dask.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from train.cpu_kernels import retain_freed_memory
from train.crop_masks import LAYERS_PATH, ChunkCache, ProposalIndex, crop_pieces, pieces_min
from train.run_config import DataConfig

GLOBAL_TASK = "global"  # the extra all-ones context task, always the last bit
_VISIT_STREAM = 0x5CA7  # third seed word of the per-visit scan draw (keeps it apart from pairs)


class SamplerError(RuntimeError):
    """The bank cannot provide what the sampler was asked for (clear, actionable message)."""


@dataclass(frozen=True)
class SamplerConfig:
    crop: int = 128
    margin: int = 16
    min_overlap: float = 2 / 3
    k: int = 13
    min_mask_voxels: int = 64
    batch_size: int = 2
    dataset_weights: dict[str, float] = field(default_factory=dict)
    modality_weights: dict[str, float] = field(default_factory=dict)
    scans: tuple[str, ...] | None = None
    max_anchor_tries: int = 20
    pairs_per_scan_visit: int = 1

    @property
    def read_size(self) -> int:
        return self.crop + 2 * self.margin

    @property
    def n_tasks(self) -> int:
        return self.k + 1

    @classmethod
    def from_config(cls, data: DataConfig | Mapping[str, Any]) -> SamplerConfig:
        """The sampler's settings from the training config's ``data`` section (typed, or its
        dict form, validated first); the loader's settings in it are not the sampler's."""
        data = data if isinstance(data, DataConfig) else DataConfig.from_dict(data)
        keys = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.to_dict().items() if k in keys}
        if kw.get("scans") is not None:
            kw["scans"] = tuple(kw["scans"])
        return cls(**kw)


def bank_fingerprint(bank) -> str:
    """Hash of the index rows that define the data (ids, sources, shapes, proposal counts)."""
    rows = [
        [r["scan_id"], r.get("source_sha256"), r.get("shape"), r.get("n_proposals")]
        for r in bank.index
    ]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def open_bank(location: str):
    """Open a bank read-only with a clear error when it is missing or not a bank."""
    from bank import Bank, BankError

    try:
        return Bank.open(location)
    except BankError as exc:
        raise SamplerError(f"cannot open bank {location!r}: {exc}") from exc
    except FileNotFoundError as exc:
        raise SamplerError(f"cannot open bank {location!r}: {exc}") from exc


def scan_weights(rows: list[dict], cfg: SamplerConfig) -> np.ndarray:
    """Per-scan draw probability: dataset weight x modality weight (default 1 each)."""
    w = np.array(
        [
            float(cfg.dataset_weights.get(r.get("dataset"), 1.0))
            * float(cfg.modality_weights.get(r.get("modality"), 1.0))
            for r in rows
        ]
    )
    if w.sum() <= 0:
        raise SamplerError("all scans have sampling weight 0 (check dataset/modality weights)")
    return w / w.sum()


def eligible_rows(bank, cfg: SamplerConfig) -> list[dict]:
    """Index rows the sampler may draw from; errors name the scans that cannot serve K."""
    rows = bank.index
    if cfg.scans is not None:
        missing = sorted(set(cfg.scans) - {r["scan_id"] for r in rows})
        if missing:
            raise SamplerError(f"scans not in bank {bank.location!r}: {missing}")
        rows = [r for r in rows if r["scan_id"] in set(cfg.scans)]
    if not rows:
        raise SamplerError(f"bank {bank.location!r} has no scans to sample from")
    few = [(r["scan_id"], int(r.get("n_proposals") or 0)) for r in rows]
    few = [(s, n) for s, n in few if n < cfg.k]
    if few:
        listed = ", ".join(f"{s} ({n})" for s, n in few[:10])
        raise SamplerError(
            f"{len(few)} scan(s) in {bank.location!r} have fewer than k={cfg.k} proposals: "
            f"{listed}{' ...' if len(few) > 10 else ''}. Generate proposals "
            "(`maskbank propose`), lower data.k, or exclude them with data.scans"
        )
    return rows


def crop_starts(
    rng: np.random.Generator, shape: tuple[int, ...], centre: np.ndarray, cfg: SamplerConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Starts of the reference and query ``crop``^3 boxes (may extend past small volumes).

    The reference box is centred near ``centre`` and kept inside the volume where
    the volume is large enough; the query box is shifted by at most
    ``crop * (1 - min_overlap)`` per axis, so the two overlap >= min_overlap per axis.
    """
    c = cfg.crop
    shape_a = np.asarray(shape)
    max_shift = int(math.floor(c * (1 - cfg.min_overlap) + 1e-9))

    def place(start: np.ndarray) -> np.ndarray:
        # Inside the volume when it fits, centred on it when it does not.
        return np.where(shape_a >= c, np.clip(start, 0, shape_a - c), (shape_a - c) // 2)

    ref = place(np.round(centre - c / 2).astype(np.int64))
    shift = rng.integers(-max_shift, max_shift + 1, size=3)
    query = place(ref + shift)
    return ref, query


def padded_roi(start: np.ndarray, size: int, shape: tuple[int, ...]):
    """ROI clipped to the volume plus where it lands in the padded ``size``^3 box."""
    src, dst = [], []
    for s, n in zip(start.tolist(), shape, strict=True):
        lo, hi = max(s, 0), min(s + size, n)
        hi = max(hi, lo)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    return tuple(src), tuple(dst)


def _within(inner, outer) -> tuple[slice, ...]:
    """``inner`` (absolute slices) relative to the block read for ``outer``."""
    return tuple(
        slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer, strict=True)
    )


class PairStream(IterableDataset):
    """IterableDataset of ready batches (dicts of tensors) from a bank.

    Each batch holds, for ``n = batch_size`` pairs and ``S = crop + 2 * margin``:
    ``ref_image``/``query_image`` float32 (n,1,S,S,S); ``ref_bits``/``query_bits``
    int32 (n,1,S,S,S) with bit k = proposal k (k < K) and bit K = the all-ones
    global task; ``sample_id`` int64 (n,); ``scan_index`` int64 (n,) into
    ``self.scan_ids``; ``ref_start``/``query_start`` int64 (n,3), the voxel
    position of the padded box in the scan; ``proposal_ids`` int64 (n,K).
    Regions outside the scan are padded with the crop's minimum (image) and 0 (masks).

    ``compact=True``: the same values in narrower types, half the bytes to write, move and
    read back -- images float16 when the bank stores them so (float32 otherwise), bit
    fields int16 (the same 16 bits; an int16 view of the unsigned field) when K + 1 <= 16.
    ``PairAugmenter`` takes either (its compiled CPU warp reads float16/int16 directly).
    """

    def __init__(
        self,
        bank: str | os.PathLike | Any,
        cfg: SamplerConfig,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        max_batches: int | None = None,
        cache_scans: int = 64,
        chunk_cache_mb: float = 256,
        compact: bool = False,
    ):
        super().__init__()
        if cfg.n_tasks > 24:
            raise SamplerError(f"k={cfg.k}: at most 23 proposals per pair are supported")
        # A path/URL, or an open `bank.Bank`: workers re-open it from its location.
        self.location = str(getattr(bank, "location", bank))
        self.cfg = cfg
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_batch = int(start_batch)
        self.max_batches = max_batches
        self.cache_scans = cache_scans
        self.chunk_cache_mb = chunk_cache_mb
        self.compact = bool(compact)
        self._image_dtype = np.dtype(np.float16)  # compact batches' image slots: the last seen
        self.chunks = ChunkCache(int(chunk_cache_mb * 2**20))
        # Validate eagerly in the parent (clear errors before workers fork), keep only
        # plain data; the Bank object itself is re-opened lazily per process.
        b = open_bank(self.location)
        rows = eligible_rows(b, cfg)
        self.scan_ids = [r["scan_id"] for r in rows]
        self.probs = scan_weights(rows, cfg)
        self.fingerprint = bank_fingerprint(b)
        self._bank = None
        self._scans: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        """Pickled (spawned workers) without decoded chunks: each process fills its own."""
        state = self.__dict__.copy()
        state["chunks"] = ChunkCache(int(self.chunk_cache_mb * 2**20))
        return state

    # ------------------------------------------------------------------ state
    def state_dict(self, batches_consumed: int) -> dict:
        return {
            "seed": self.seed,
            "next_batch": int(batches_consumed),
            "world_size": self.world_size,
            "fingerprint": self.fingerprint,
            "config": asdict(self.cfg),
        }

    # ------------------------------------------------------------------ access
    def _open(self, scan_id: str):
        if self._pid != os.getpid():  # forked after use: never share zarr/fsspec handles
            self._bank, self._scans, self._pid = None, OrderedDict(), os.getpid()
            self.chunks = ChunkCache(int(self.chunk_cache_mb * 2**20))
        if self._bank is None:
            self._bank = open_bank(self.location)
        if scan_id in self._scans:
            self._scans.move_to_end(scan_id)
            return self._scans[scan_id]
        from bank.proposals import ProposalReader

        view = self._bank.scan(scan_id)
        entry = (view, ProposalIndex(ProposalReader(view)))
        self._scans[scan_id] = entry
        if len(self._scans) > self.cache_scans:
            self._scans.popitem(last=False)
        return entry

    def sample_ids_of_batch(self, local_batch: int) -> range:
        g = local_batch * self.world_size + self.rank
        b = self.cfg.batch_size
        return range(g * b, (g + 1) * b)

    def _padded(self, dst, fill, dtype, out: np.ndarray | None = None) -> np.ndarray:
        """Uninitialised read_size^3 array (or ``out``) whose voxels outside ``dst`` are ``fill``.

        Only the (up to six) slabs around ``dst`` are written, not the whole box, and
        none twice: the x slabs whole, the y slabs within ``dst``'s x range, the z slabs
        within its x and y ranges (torch's fill: ~2.5x numpy's strided assignment).
        """
        size = self.cfg.read_size
        out = np.empty((size,) * 3, dtype) if out is None else out
        t = torch.from_numpy(out)
        if out.dtype == np.uint16:  # compact bit fields: filled through their int16 view
            t = torch.from_numpy(out.view(np.int16))
            fill = int(fill) - (1 << 16) if int(fill) >= 1 << 15 else int(fill)
        inner: tuple[slice, ...] = ()
        for d in dst:
            for part in (slice(0, d.start), slice(d.stop, size)):
                if part.stop > part.start:
                    t[(*inner, part)].fill_(fill)
            inner = (*inner, d)
        return out

    def _place(self, block: np.ndarray, dst, fill, dtype=None, out=None) -> np.ndarray:
        """``block`` in a padded read_size^3 array of ``dtype`` (cast while copying; into ``out``)."""
        size = self.cfg.read_size
        dtype = block.dtype if dtype is None else np.dtype(dtype)
        if block.shape == (size,) * 3 and out is None:  # box inside the scan, no padding
            return block.astype(dtype, order="C", copy=True)
        out = self._padded(dst, fill, dtype, out)
        out[dst] = block
        return out

    def _assemble(self, pieces, dst, fill: float, out=None, dtype=np.float32) -> np.ndarray:
        """read_size^3 crop (``dtype``, or ``out``'s) from chunk pieces (dst relative to
        ``dst``), ``fill`` outside."""
        out = self._padded(dst, fill, dtype, out)
        # torch's float16 -> float32 cast is vectorised: ~5-15x numpy's on prepared banks.
        box = torch.from_numpy(out)[dst]
        for chunk, src, d in pieces:
            box[d].copy_(torch.from_numpy(chunk)[src])
        return out

    def sample(self, sample_id: int, out: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Draw pair ``sample_id`` (pure function of seed and id).

        ``out`` optionally maps ``ref_image``/``query_image`` (float32) and
        ``ref_bits``/``query_bits`` (int32) to read_size^3 arrays to fill (e.g. slots
        of a batch), instead of new arrays. ``compact``: new images are float16 when the
        bank's are (an image slot in ``out`` of another type is not used), bit fields int16 when
        K + 1 <= 16 (the same 16 bits; slots in ``out`` are uint16).
        """
        cfg = self.cfg
        out = out or {}
        rng = np.random.default_rng([self.seed, int(sample_id)])
        visit = max(int(cfg.pairs_per_scan_visit), 1)
        for attempt in range(8):  # scans
            if visit > 1 and attempt == 0:  # the visit's scan; fallbacks use the pair's rng
                vrng = np.random.default_rng([self.seed, int(sample_id) // visit, _VISIT_STREAM])
                si = int(vrng.choice(len(self.scan_ids), p=self.probs))
            else:
                si = int(rng.choice(len(self.scan_ids), p=self.probs))
            view, index = self._open(self.scan_ids[si])
            shape = tuple(view.shape)
            for _ in range(cfg.max_anchor_tries):
                anchor = index.centroid[rng.integers(index.count)]
                anchor = anchor + rng.uniform(-cfg.crop / 4, cfg.crop / 4, size=3)
                ref0, q0 = crop_starts(rng, shape, anchor, cfg)
                inner, _ = padded_roi(ref0, cfg.crop, shape)
                # Cheap necessary condition from the bounding boxes before any read.
                cand = index.bbox_overlap(inner) >= cfg.min_mask_voxels
                if np.count_nonzero(cand) < cfg.k:
                    continue
                # Candidates' layers are read in the reference crop only (for the counts);
                # only the chosen proposals' layers are read in the whole union box.
                counts = index.counts_in_pieces(
                    {
                        int(j): self.chunks.pieces(view, LAYERS_PATH + index.layer_names[j], inner)
                        for j in np.unique(index.layer[cand])
                    }
                )
                ok = np.flatnonzero(counts >= cfg.min_mask_voxels)
                if len(ok) < cfg.k:
                    continue
                ids = np.sort(rng.choice(ok, size=cfg.k, replace=False))
                ref_start, q_start = ref0 - cfg.margin, q0 - cfg.margin
                ref_src, ref_dst = padded_roi(ref_start, cfg.read_size, shape)
                q_src, q_dst = padded_roi(q_start, cfg.read_size, shape)
                # One read of the union box serves both crops (they overlap >= 2/3 per axis).
                union = tuple(
                    slice(min(r.start, q.start), max(r.stop, q.stop))
                    for r, q in zip(ref_src, q_src, strict=True)
                )
                ushape = tuple(u.stop - u.start for u in union)
                # The image is assembled straight from its chunks into each padded crop,
                # cast to float32 while copying (float16 in prepared banks).
                image = self.chunks.pieces(view, "image", union)
                size = cfg.read_size
                padded = any(d.start > 0 or d.stop < size for d in (*ref_dst, *q_dst))
                pad = pieces_min(image) if padded else 0.0  # only used outside the scan
                idt = np.float32
                if self.compact:
                    if image and image[0][0].dtype == np.float16:
                        idt = np.float16
                    self._image_dtype = np.dtype(idt)
                    for key in ("ref_image", "query_image"):  # a slot of another type: not used
                        if key in out and out[key].dtype != idt:
                            out = {k: v for k, v in out.items() if k != key}
                ref_img = self._assemble(
                    crop_pieces(image, _within(ref_src, union)),
                    ref_dst,
                    pad,
                    out.get("ref_image"),
                    idt,
                )
                q_img = self._assemble(
                    crop_pieces(image, _within(q_src, union)),
                    q_dst,
                    pad,
                    out.get("query_image"),
                    idt,
                )
                layers = {
                    int(j): self.chunks.pieces(view, LAYERS_PATH + index.layer_names[j], union)
                    for j in np.unique(index.layer[ids])
                }
                # Bit K is the global all-ones task. The field is built as uint16 when the
                # K + 1 bits fit (cheaper lookups) and cast to int32 while placing each crop.
                glob = 1 << cfg.k
                origin = [u.start for u in union]
                small = np.uint16 if cfg.k < 16 else np.int32
                bits = index.bits(layers, ids, ushape, glob, origin, small)
                bdt = np.uint16 if self.compact and small == np.uint16 else np.int32
                ref_bits = self._place(
                    bits[_within(ref_src, union)], ref_dst, glob, bdt, out.get("ref_bits")
                )
                q_bits = self._place(
                    bits[_within(q_src, union)], q_dst, glob, bdt, out.get("query_bits")
                )
                if bdt == np.uint16:  # int16 views (torch has few uint16 kernels)
                    ref_bits, q_bits = ref_bits.view(np.int16), q_bits.view(np.int16)
                return {
                    "ref_image": ref_img,
                    "query_image": q_img,
                    "ref_bits": ref_bits,
                    "query_bits": q_bits,
                    "sample_id": int(sample_id),
                    "scan_index": si,
                    "ref_start": ref_start,
                    "query_start": q_start,
                    "proposal_ids": ids.astype(np.int64),
                }
        raise SamplerError(
            f"sample {sample_id}: no crop of {cfg.crop}^3 with k={cfg.k} proposals of >= "
            f"{cfg.min_mask_voxels} voxels found (last scan tried: {self.scan_ids[si]!r}, "
            f"shape {shape}); lower data.k or data.min_mask_voxels, or add proposals"
        )

    def batch(self, local_batch: int) -> dict[str, torch.Tensor]:
        """One batch; each pair's crops are written straight into their batch slots (no stack)."""
        ids = self.sample_ids_of_batch(local_batch)
        shape = (len(ids), 1) + (self.cfg.read_size,) * 3
        # Compact: images in the bank's type, bits in int16 slots (filled through uint16 views).
        idt = self._image_dtype if self.compact else np.dtype(np.float32)
        bdt = np.int16 if self.compact and self.cfg.k < 16 else np.int32
        arrays = {
            "ref_image": np.empty(shape, idt),
            "query_image": np.empty(shape, idt),
            "ref_bits": np.empty(shape, bdt),
            "query_bits": np.empty(shape, bdt),
        }
        samples = []
        for j, i in enumerate(ids):
            slots = {k: a[j, 0] for k, a in arrays.items()}
            if bdt == np.int16:
                slots["ref_bits"] = slots["ref_bits"].view(np.uint16)
                slots["query_bits"] = slots["query_bits"].view(np.uint16)
            samples.append(self.sample(i, slots))
        for key in ("ref_image", "query_image"):
            got = [smp[key] for smp in samples]
            if any(g.dtype != idt for g in got):  # compact, a scan of another type: restacked
                arrays[key] = np.stack(got).astype(np.result_type(*got))[:, None]
        out: dict[str, torch.Tensor] = {k: torch.from_numpy(a) for k, a in arrays.items()}
        for key in ("sample_id", "scan_index", "ref_start", "query_start", "proposal_ids"):
            out[key] = torch.from_numpy(np.asarray([s[key] for s in samples], dtype=np.int64))
        return out

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start_batch + wid
        stop = None if self.max_batches is None else self.start_batch + self.max_batches
        while stop is None or b < stop:
            yield self.batch(b)
            b += nw


def _worker_ignores_sigterm(worker_id: int) -> None:
    """Preemption sends SIGTERM to every process; the main process checkpoints, workers must
    keep serving until it shuts them down (torch's default handler would kill them first).
    Freed buffers stay in the worker's heap for the next batch (``retain_freed_memory``)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    retain_freed_memory()


def make_loader(
    stream: PairStream,
    num_workers: int,
    prefetch_factor: int = 4,
    pin_memory: bool = False,
    timeout: float = 0.0,
) -> torch.utils.data.DataLoader:
    """DataLoader over ready batches: workers prefetch, the main process only pins.

    ``timeout`` (seconds, workers only; 0 = forever) turns a hung worker into a
    ``RuntimeError`` instead of a run that waits forever.
    """
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw = {
            "prefetch_factor": prefetch_factor,
            "persistent_workers": False,
            "worker_init_fn": _worker_ignores_sigterm,
            "timeout": max(0.0, float(timeout)),
        }
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kw
    )
