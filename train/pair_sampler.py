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
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from maskbank.bank import ChunkCache
from maskbank.train.crop_masks import ProposalIndex, crop_pieces, pieces_min
from maskbank.train.memory_policy import retain_freed_memory
from maskbank.train.run_config import DataConfig

GLOBAL_TASK = "global"  # the extra all-ones context task, always the last bit
_VISIT_STREAM = 0x5CA7  # third seed word of the per-visit scan draw (keeps it apart from pairs)
# Scans drawn for one pair before the sampler gives up, each tried at max_anchor_tries
# anchors: bounds what one pair can cost on a bank where few crops show K proposals, and
# turns such a bank into a SamplerError instead of an endless search.
MAX_SCANS_PER_PAIR = 8


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
    proposals: str = "default"  # the proposal set drawn from
    max_anchor_tries: int = 20
    pairs_per_scan_visit: int = 1
    disjoint_frac: float = 0.0  # share of pairs whose query box does not overlap the reference
    absent_frac: float = 0.0  # share of tasks drawn among proposals whose box misses the query
    max_ref_fill: float = 1.0  # proposals filling more of the reference crop: drawn last

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


def set_count(row: dict, name: str) -> int | None:
    """Proposals of set ``name`` in an index row, None when the scan lacks the set (rows
    written before named sets existed describe the default set by ``n_proposals`` alone)."""
    sets = row.get("proposal_sets")
    if isinstance(sets, dict):
        got = sets.get(name)
        return None if got is None else int(got.get("n") or 0)
    return int(row.get("n_proposals") or 0) if name == "default" else None


def bank_fingerprint(bank, proposals: str = "default") -> str:
    """Hash of the index rows that define the data (ids, sources, shapes, proposal counts)."""
    rows = [
        [r["scan_id"], r.get("source_sha256"), r.get("shape"), r.get("n_proposals")]
        for r in bank.index
    ]
    if proposals != "default":  # a named set's counts too (default fingerprints stay as they were)
        rows.append([proposals, [set_count(r, proposals) for r in bank.index]])
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def open_bank(location: str):
    """Open a bank read-only with a clear error when it is missing or not a bank."""
    from maskbank.bank import Bank, BankError

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
    if cfg.proposals != "default":  # a named set: the scans that have it
        having = [r for r in rows if set_count(r, cfg.proposals) is not None]
        if not having:
            names = sorted({n for r in rows for n in (r.get("proposal_sets") or {})})
            raise SamplerError(
                f"no scan in {bank.location!r} has proposal set {cfg.proposals!r} "
                f"(sets there: {', '.join(names) or 'none'}); make it with `maskbank propose "
                f"BANK --name {cfg.proposals}` or `--import DIR --name {cfg.proposals}`"
            )
        rows = having
    few = [(r["scan_id"], set_count(r, cfg.proposals) or 0) for r in rows]
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


def disjoint_query_start(
    rng: np.random.Generator, shape: tuple[int, ...], ref: np.ndarray, cfg: SamplerConfig
) -> np.ndarray:
    """Start of a query box beside the reference box, not overlapping it where the scan has room.

    Inference slides windows over whole scans, most of them away from the structure; this
    box sits past one face of the reference (a gap of up to ``crop // 2``), on the first axis
    (in a random order) with room for a whole crop on a random side, and is shifted as an
    overlapping query would be on the others. Without room anywhere (a scan under two crops
    per axis), it lies as far from the reference as the scan allows on a random axis.
    """
    c = cfg.crop
    shape_a = np.asarray(shape)
    max_shift = int(math.floor(c * (1 - cfg.min_overlap) + 1e-9))
    start = ref + rng.integers(-max_shift, max_shift + 1, size=3)
    start = np.where(shape_a >= c, np.clip(start, 0, np.maximum(shape_a - c, 0)), start)
    gap = int(rng.integers(0, c // 2 + 1))
    axes = rng.permutation(3)
    sides = rng.permutation([-1, 1])
    for axis in axes:
        for side in sides:
            if side > 0 and shape_a[axis] - (ref[axis] + c) >= c:
                start[axis] = min(ref[axis] + c + gap, shape_a[axis] - c)
                return start
            if side < 0 and ref[axis] >= c:
                start[axis] = max(ref[axis] - c - gap, 0)
                return start
    axis = axes[0]
    start[axis] = max(shape_a[axis] - c, 0) if 2 * ref[axis] < shape_a[axis] - c else 0
    return start


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


def stored_image_dtype(view) -> np.dtype:
    """The type a scan stores its image in, from its metadata (nothing decoded)."""
    record = view.info.get("arrays", {}).get("image", {})
    return np.dtype(record["dtype"]) if "dtype" in record else np.dtype(view.array("image").dtype)


class OpenScan(NamedTuple):
    """A scan the stream has opened: its view, proposal index and stored image type."""

    view: Any
    index: ProposalIndex
    image_dtype: np.dtype


@dataclass(frozen=True)
class PairBoxes:
    """A pair's two padded read boxes: where each lies in the scan (``*_src``, clipped) and
    in its read_size^3 crop (``*_dst``), and their union, read once for both."""

    ref_start: np.ndarray
    query_start: np.ndarray
    ref_src: tuple[slice, ...]
    ref_dst: tuple[slice, ...]
    query_src: tuple[slice, ...]
    query_dst: tuple[slice, ...]
    union: tuple[slice, ...]

    @classmethod
    def around(
        cls, ref0: np.ndarray, q0: np.ndarray, cfg: SamplerConfig, shape: tuple[int, ...]
    ) -> PairBoxes:
        """The boxes of the crops starting at ``ref0`` and ``q0``, ``margin`` wider per side."""
        ref_start, q_start = ref0 - cfg.margin, q0 - cfg.margin
        ref_src, ref_dst = padded_roi(ref_start, cfg.read_size, shape)
        q_src, q_dst = padded_roi(q_start, cfg.read_size, shape)
        # One read of the union box serves both crops (they overlap >= min_overlap per axis).
        union = tuple(
            slice(min(r.start, q.start), max(r.stop, q.stop))
            for r, q in zip(ref_src, q_src, strict=True)
        )
        return cls(ref_start, q_start, ref_src, ref_dst, q_src, q_dst, union)

    @property
    def union_shape(self) -> tuple[int, ...]:
        return tuple(u.stop - u.start for u in self.union)

    def padded(self, size: int) -> bool:
        """Whether either crop reaches outside the scan (then it needs a fill value)."""
        return any(d.start > 0 or d.stop < size for d in (*self.ref_dst, *self.query_dst))

    def crops(self, kind: str) -> tuple[tuple[str, tuple[slice, ...], tuple[slice, ...]], ...]:
        """``(output key, src, dst)`` of the reference and query crops of ``kind``."""
        return (
            (f"ref_{kind}", self.ref_src, self.ref_dst),
            (f"query_{kind}", self.query_src, self.query_dst),
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
        self.chunks = ChunkCache(int(chunk_cache_mb * 2**20))
        # Validate eagerly in the parent (clear errors before workers fork), keep only
        # plain data; the Bank object itself is re-opened lazily per process.
        b = open_bank(self.location)
        rows = eligible_rows(b, cfg)
        self.scan_ids = [r["scan_id"] for r in rows]
        self.probs = scan_weights(rows, cfg)
        self.fingerprint = bank_fingerprint(b, cfg.proposals)
        # The image type of this stream's batches, set once here: float32, or (compact) the
        # crops' type of the bank's first scan -- prepared banks store one type throughout;
        # a pair from a scan of another type is restacked in ``batch``.
        self.image_dtype = self._crop_image_dtype(stored_image_dtype(b.scan(self.scan_ids[0])))
        self._bank = None
        self._scans: OrderedDict[str, OpenScan] = OrderedDict()
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
    def _open(self, scan_id: str) -> OpenScan:
        if self._pid != os.getpid():  # forked after use: never share zarr/fsspec handles
            self._bank, self._scans, self._pid = None, OrderedDict(), os.getpid()
            self.chunks = ChunkCache(int(self.chunk_cache_mb * 2**20))
        if self._bank is None:
            self._bank = open_bank(self.location)
        if scan_id in self._scans:
            self._scans.move_to_end(scan_id)
            return self._scans[scan_id]
        from maskbank.bank.proposals import ProposalReader

        view = self._bank.scan(scan_id)
        reader = ProposalReader(view, self.cfg.proposals)
        entry = OpenScan(view, ProposalIndex(reader), stored_image_dtype(view))
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
        scan's are (an image slot in ``out`` of another type is not used), bit fields int16 when
        K + 1 <= 16 (the same 16 bits; slots in ``out`` are uint16).
        """
        out = out or {}
        rng = np.random.default_rng([self.seed, int(sample_id)])
        for attempt in range(MAX_SCANS_PER_PAIR):
            si = self._choose_scan(rng, int(sample_id), attempt)
            scan = self._open(self.scan_ids[si])
            chosen = self._choose_crops_and_proposals(rng, scan)
            if chosen is None:
                continue
            boxes, ids = chosen
            return {
                **self._read_images(scan, boxes, out),
                **self._build_masks(scan, boxes, ids, out),
                "sample_id": int(sample_id),
                "scan_index": si,
                "ref_start": boxes.ref_start,
                "query_start": boxes.query_start,
                "proposal_ids": ids.astype(np.int64),
            }
        cfg = self.cfg
        raise SamplerError(
            f"sample {sample_id}: no crop of {cfg.crop}^3 with k={cfg.k} proposals of >= "
            f"{cfg.min_mask_voxels} voxels found (last scan tried: {self.scan_ids[si]!r}, "
            f"shape {tuple(scan.view.shape)}); lower data.k or data.min_mask_voxels, or add "
            "proposals"
        )

    def _choose_scan(self, rng: np.random.Generator, sample_id: int, attempt: int) -> int:
        """Index of the scan to draw from: with P pairs per scan visit, the first try takes
        the visit's scan (drawn from ``(seed, id // P)``); other tries, the pair's own draw."""
        visit = max(self.cfg.pairs_per_scan_visit, 1)
        if visit > 1 and attempt == 0:
            vrng = np.random.default_rng([self.seed, sample_id // visit, _VISIT_STREAM])
            return int(vrng.choice(len(self.scan_ids), p=self.probs))
        return int(rng.choice(len(self.scan_ids), p=self.probs))

    def _choose_crops_and_proposals(
        self, rng: np.random.Generator, scan: OpenScan
    ) -> tuple[PairBoxes, np.ndarray] | None:
        """A crop pair around an anchor whose reference crop shows K proposals, and those K;
        None when ``max_anchor_tries`` anchors of this scan all fail."""
        shape = tuple(scan.view.shape)
        for _ in range(self.cfg.max_anchor_tries):
            ref0, q0 = self._choose_crop_pair(rng, shape, scan.index)
            ids = self._choose_visible_proposals(rng, scan, ref0, q0, shape)
            if ids is not None:
                return PairBoxes.around(ref0, q0, self.cfg, shape), ids
        return None

    def _choose_crop_pair(
        self, rng: np.random.Generator, shape: tuple[int, ...], index: ProposalIndex
    ) -> tuple[np.ndarray, np.ndarray]:
        """Starts of the reference and query crops, around a jittered proposal centroid."""
        cfg = self.cfg
        anchor = index.centroid[rng.integers(index.count)]
        anchor = anchor + rng.uniform(-cfg.crop / 4, cfg.crop / 4, size=3)
        ref0, q0 = crop_starts(rng, shape, anchor, cfg)
        # Only drawn when asked for: streams without disjoint pairs stay as they were.
        if cfg.disjoint_frac > 0 and rng.random() < cfg.disjoint_frac:
            q0 = disjoint_query_start(rng, shape, ref0, cfg)
        return ref0, q0

    def _choose_visible_proposals(
        self,
        rng: np.random.Generator,
        scan: OpenScan,
        ref0: np.ndarray,
        q0: np.ndarray,
        shape: tuple[int, ...],
    ) -> np.ndarray | None:
        """K proposals (sorted ids) with >= min_mask_voxels voxels in the reference crop, or
        None when fewer than K have that many (preferences: ``_prefer``)."""
        cfg, index = self.cfg, scan.index
        inner, _ = padded_roi(ref0, cfg.crop, shape)
        # Cheap necessary condition from the bounding boxes before any read.
        cand = index.bbox_overlap(inner) >= cfg.min_mask_voxels
        if np.count_nonzero(cand) < cfg.k:
            return None
        # Candidates' layers are read in the reference crop only (for the counts);
        # only the chosen proposals' layers are read in the whole union box.
        counts = index.counts_in_pieces(
            {
                int(j): self.chunks.pieces(scan.view, index.layer_arrays[j], inner)
                for j in np.unique(index.layer[cand])
            }
        )
        ok = np.flatnonzero(counts >= cfg.min_mask_voxels)
        if len(ok) < cfg.k:
            return None
        if cfg.max_ref_fill >= 1 and cfg.absent_frac <= 0:
            return np.sort(rng.choice(ok, size=cfg.k, replace=False))
        return self._prefer(rng, index, ok, counts[ok], inner, q0, shape)

    def _prefer(
        self,
        rng: np.random.Generator,
        index: ProposalIndex,
        ok: np.ndarray,
        counts: np.ndarray,
        inner: tuple[slice, ...],
        q0: np.ndarray,
        shape: tuple[int, ...],
    ) -> np.ndarray:
        """K of the visible proposals ``ok``: Binomial(K, absent_frac) of them among those whose
        box misses the query crop (as many as there are), the rest among the others first;
        within each, proposals that leave the reference a boundary (cover at most
        ``max_ref_fill`` of the crop, box not holding it) before those that fill it."""
        cfg = self.cfg
        vol = math.prod(s.stop - s.start for s in inner)
        fills = (counts > cfg.max_ref_fill * cfg.crop**3) | (index.bbox_overlap(inner)[ok] >= vol)
        q_inner, _ = padded_roi(q0, cfg.crop, shape)
        absent = index.bbox_overlap(q_inner)[ok] == 0
        n_abs = int(rng.binomial(cfg.k, cfg.absent_frac)) if cfg.absent_frac > 0 else 0
        perm = rng.permutation(len(ok))
        # Stable sorts of a random order: ties stay random.
        by_fill = perm[np.argsort(fills[perm], kind="stable")]
        picked = [i for i in by_fill if absent[i]][:n_abs]
        rest = np.setdiff1d(by_fill, picked, assume_unique=True)
        rest = by_fill[np.isin(by_fill, rest)]  # back in preference order
        rest = rest[np.argsort(2 * fills[rest] + absent[rest], kind="stable")]
        chosen = np.concatenate([np.asarray(picked, np.int64), rest[: cfg.k - len(picked)]])
        return np.sort(ok[chosen])

    def _read_images(
        self, scan: OpenScan, boxes: PairBoxes, out: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """``ref_image`` and ``query_image``: one read of the union box, assembled straight
        from its chunks into each padded crop, cast while copying; the crop's minimum outside
        the scan."""
        image = self.chunks.pieces(scan.view, "image", boxes.union)
        pad = pieces_min(image) if boxes.padded(self.cfg.read_size) else 0.0
        dtype = self._crop_image_dtype(scan.image_dtype)
        crops = {}
        for key, src, dst in boxes.crops("image"):
            slot = out.get(key)
            if self.compact and slot is not None and slot.dtype != dtype:
                slot = None  # a slot of another type: not used
            pieces = crop_pieces(image, _within(src, boxes.union))
            crops[key] = self._assemble(pieces, dst, pad, slot, dtype)
        return crops

    def _build_masks(
        self, scan: OpenScan, boxes: PairBoxes, ids: np.ndarray, out: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """``ref_bits`` and ``query_bits``: the K proposals' masks as one bit field per crop
        (bit k = proposal k, bit K = the all-ones global task, also set outside the scan)."""
        cfg, index = self.cfg, scan.index
        layers = {
            int(j): self.chunks.pieces(scan.view, index.layer_arrays[j], boxes.union)
            for j in np.unique(index.layer[ids])
        }
        # The field is built as uint16 when the K + 1 bits fit (cheaper lookups) and cast to
        # int32 while placing each crop (compact: kept 16-bit).
        glob = 1 << cfg.k
        origin = [u.start for u in boxes.union]
        small = np.uint16 if cfg.k < 16 else np.int32
        bits = index.bits(layers, ids, boxes.union_shape, glob, origin, small)
        dtype = np.uint16 if self.compact and small == np.uint16 else np.int32
        crops = {}
        for key, src, dst in boxes.crops("bits"):
            crop = self._place(bits[_within(src, boxes.union)], dst, glob, dtype, out.get(key))
            # int16 views of compact fields (torch has few uint16 kernels).
            crops[key] = crop.view(np.int16) if dtype == np.uint16 else crop
        return crops

    def _crop_image_dtype(self, stored: np.dtype) -> np.dtype:
        """Type of a crop's image: float32, or compact float16 when the scan stores float16."""
        return np.dtype(np.float16 if self.compact and stored == np.float16 else np.float32)

    def batch(self, local_batch: int) -> dict[str, torch.Tensor]:
        """One batch; each pair's crops are written straight into their batch slots (no stack)."""
        ids = self.sample_ids_of_batch(local_batch)
        shape = (len(ids), 1) + (self.cfg.read_size,) * 3
        # Compact: images in the bank's type, bits in int16 slots (filled through uint16 views).
        idt = self.image_dtype
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
