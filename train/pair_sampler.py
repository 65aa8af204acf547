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
  ``data.pairs_per_scan_visit = P > 1`` the scan of pair ``i`` is drawn from
  ``(seed, i // P)``: P consecutive pairs share a scan (different anchors, crops
  and proposals), which turns most reads into cache hits on large banks too, at
  the price of less scan diversity within a batch. P = 1 (default) is the
  original stream, pair for pair.
* **Lazy, per-process store handles, no index in the workers.** Scans are opened
  through ``Bank.opener`` (their paths fixed in the parent): each process opens its
  own store on first use, never a handle inherited over a fork, and no worker parses
  the bank's index.
* **One config.** The stream takes the training config's ``data`` section
  (``run_config.DataConfig``) as it is: every sampler knob is a ``data.<key>``.
* This module imports numpy, torch and ``bank`` only: no Prefect, no Dask.

Its parts, one concept each: which scans are drawn (``train.scan_choice``), where a pair's
crops lie (``train.crop_placement``), which K proposals it trains on
(``train.proposal_choice``); this module draws pairs with them and assembles the batches.
"""

from __future__ import annotations

import gc
import os
import signal
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from maskbank.bank import Bank
from maskbank.bank.sampling import ChunkCache
from maskbank.train.crop_masks import ProposalIndex, crop_pieces, pieces_min
from maskbank.train.crop_placement import (
    PairBoxes,
    crop_starts,
    disjoint_query_start,
    within,
)
from maskbank.train.memory_policy import retain_freed_memory
from maskbank.train.proposal_choice import choose_visible_proposals
from maskbank.train.run_config import DataConfig
from maskbank.train.scan_choice import (
    SamplerError,
    bank_fingerprint,
    eligible_rows,
    gc_paused,
    open_bank,
    scan_weights,
)
from maskbank.train.seeding import numpy_rng

GLOBAL_TASK = "global"  # the extra all-ones context task, always the last bit
_VISIT_STREAM = 0x5CA7  # third seed word of the per-visit scan draw (keeps it apart from pairs)
# Scans drawn for one pair before the sampler gives up, each tried at data.max_anchor_tries
# anchors: bounds what one pair can cost on a bank where few crops show K proposals, and
# turns such a bank into a SamplerError instead of an endless search.
MAX_SCANS_PER_PAIR = 8


def stored_image_dtype(view) -> np.dtype:
    """The type a scan stores its image in, from its metadata (nothing decoded)."""
    record = view.info.get("arrays", {}).get("image", {})
    return np.dtype(record["dtype"]) if "dtype" in record else np.dtype(view.array("image").dtype)


class OpenScan(NamedTuple):
    """A scan the stream has opened: its view, proposal index and stored image type."""

    view: Any
    index: ProposalIndex
    image_dtype: np.dtype


class PairStream(IterableDataset):
    """IterableDataset of ready batches (dicts of tensors) from a bank.

    ``cfg`` is the training config's ``data`` section (``DataConfig``, validated when built:
    K <= 23 among others); the stream reads its sampler knobs and ignores the loader's.

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
        cfg: DataConfig,
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
        # plain data; other processes (DataLoader workers) open scans lazily through an
        # opener, each its own store. An open Bank given is read as it is and serves this
        # process (no second parse of the index: ~0.7 s at 100,000 scans); a bank opened
        # here is read and dropped with the collector off (``gc_paused``).
        with gc_paused():
            b = bank if isinstance(bank, Bank) else open_bank(self.location)
            rows = eligible_rows(b, cfg, report=self.rank == 0)  # skipped scans: one warning
            self.scan_ids = [r["scan_id"] for r in rows]
            self.probs = scan_weights(rows, cfg)
            self.fingerprint = bank_fingerprint(b, cfg.proposals)
            # The image type of this stream's batches, set once here: float32, or (compact)
            # the crops' type of the bank's first scan -- prepared banks store one type
            # throughout; a pair from a scan of another type is restacked in ``batch``.
            first = stored_image_dtype(b.scan(self.scan_ids[0]))
            # What other processes open scans with: no index to parse (~300 MiB at 100k).
            self._opener = b.opener(self.scan_ids)
            del b, rows
        self.image_dtype = self._crop_image_dtype(first)
        # An open Bank given serves this process too; another process opens its own.
        self._bank = bank if isinstance(bank, Bank) else None
        self._scans: OrderedDict[str, OpenScan] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        """Pickled (spawned workers) without decoded chunks: each process fills its own."""
        state = self.__dict__.copy()
        state["chunks"] = ChunkCache(int(self.chunk_cache_mb * 2**20))
        state["_bank"], state["_scans"] = None, OrderedDict()  # each process opens its own
        return state

    # ------------------------------------------------------------------ state
    def state_dict(self, batches_consumed: int) -> dict:
        return {
            "seed": self.seed,
            "next_batch": int(batches_consumed),
            "world_size": self.world_size,
            "fingerprint": self.fingerprint,
            "config": self.cfg.to_dict(),
        }

    # ------------------------------------------------------------------ access
    def _open(self, scan_id: str) -> OpenScan:
        if self._pid != os.getpid():  # forked after use: never share zarr/fsspec handles
            self._bank, self._scans, self._pid = None, OrderedDict(), os.getpid()
            self.chunks = ChunkCache(int(self.chunk_cache_mb * 2**20))
        if self._bank is None:
            self._bank = self._opener  # opens its own store in this process
            if get_worker_info() is not None:
                # A DataLoader worker keeps what it inherited for life: frozen, the
                # collector never walks it again, and never writes into the parent's pages
                # (which would copy them into this worker).
                gc.freeze()
        if scan_id in self._scans:
            self._scans.move_to_end(scan_id)
            return self._scans[scan_id]
        from maskbank.bank.sampling import ProposalReader

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
        rng = numpy_rng(self.seed, int(sample_id))
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
        visit = self.cfg.pairs_per_scan_visit
        if visit > 1 and attempt == 0:
            vrng = numpy_rng(self.seed, sample_id // visit, _VISIT_STREAM)
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
            ids = choose_visible_proposals(
                rng, self.cfg, scan.view, scan.index, self.chunks, ref0, q0
            )
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
            pieces = crop_pieces(image, within(src, boxes.union))
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
            crop = self._place(bits[within(src, boxes.union)], dst, glob, dtype, out.get(key))
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
