"""A per-process cache of decoded chunks, and reads of array regions as chunk pieces.

The sampler's hot path: a crop of a bank volume is served as the decoded chunks
that cover it (``Piece``: chunk, the slices of it inside the region, the slices
of the region they fill), decoded straight from the bank's shards
(``bank.chunk_reader``) and kept for the next overlapping crop. Callers that
consume pieces one by one (histograms, lookups, casts into a buffer) never
assemble the region, so a read costs no copy beyond decompression.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

import numpy as np

from .chunk_reader import ShardedBloscReader, local_member

#: (decoded chunk, slices of it, slices of the destination region they fill). The chunk is
#: shared with the cache: read it, never write to it.
Piece = tuple[np.ndarray, tuple[slice, ...], tuple[slice, ...]]


class ChunkCache:
    """Per-process LRU of decoded chunks, so overlapping reads decode each chunk once.

    Why: consecutive pairs often come from the same scan (always so with
    ``pairs_per_scan_visit > 1``, and in small banks), and their boxes overlap;
    decompressing the same 64^3 chunks again dominates the read. A read fetches
    only the chunks it lacks -- through ``ShardedBloscReader`` for the bank's
    sharded Blosc layout, else as the chunk-aligned bounding box from
    ``ScanView.read`` -- and assembles the ROI from them. Bounded by
    ``max_bytes`` (0 disables caching: every read decodes its chunks, as on a
    huge bank). Results equal ``ScanView.read``.

    ``view`` is a ``ScanView`` (anything with its ``scan_id``, ``group``, ``array``
    and ``read``); ``name`` an array name as ``ScanView.read`` takes it, e.g.
    ``"image"`` or ``ProposalReader.layer_array_name(j)``. One cache per process:
    it is not thread-safe.
    """

    MAX_READERS = 512  # arrays whose shard indexes stay loaded (a scan has a few)

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._chunks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        # Readers hold their shards' indexes; bounded, as a worker on a bank of thousands of
        # scans would otherwise keep one per array it ever read.
        self._readers: OrderedDict[tuple[str, str], tuple[Any, ShardedBloscReader | None, Any]] = (
            OrderedDict()
        )

    def clear(self) -> None:
        """Forget every cached chunk (shard readers stay)."""
        self._chunks.clear()
        self.nbytes = 0

    def _source(self, view, name: str) -> tuple[ShardedBloscReader | None, Any]:
        """(direct shard reader or None, zarr array or None) of ``name`` in ``view``'s scan.

        On a local store the reader is built from the array's ``zarr.json`` without
        opening it in zarr (``ShardedBloscReader.of_local``); otherwise, or for another
        layout, the array is opened and read through ``ShardedBloscReader.of`` or zarr.
        Kept per (scan, name) while the view is the same object (a re-opened scan is
        read afresh), at most ``MAX_READERS`` of them.
        """
        key = (view.scan_id, name)
        got = self._readers.get(key)
        if got is None or got[0] is not view:
            arr = None
            where = local_member(getattr(view, "group", None), name)
            reader = None if where is None else ShardedBloscReader.of_local(*where)
            if reader is None:
                arr = view.array(name)
                reader = ShardedBloscReader.of(arr)
            got = (view, reader, arr)
            self._readers[key] = got
        self._readers.move_to_end(key)
        while len(self._readers) > self.MAX_READERS:
            self._readers.popitem(last=False)
        return got[1], got[2]

    def _fetch(self, view, name: str, missing: list[tuple[int, ...]]) -> dict:
        reader, arr = self._source(view, name)
        if reader is not None:
            return reader.read_chunks(missing)
        shape, cs = tuple(arr.shape), tuple(arr.chunks)
        lo = np.min(missing, axis=0)
        hi = np.max(missing, axis=0) + 1
        box = tuple(
            slice(int(a) * c, min(int(b) * c, n))
            for a, b, c, n in zip(lo, hi, cs, shape, strict=True)
        )
        block = np.asarray(view.read(name, box))
        out = {}
        for g in missing:
            sub = tuple(
                slice((x - a) * c, (x - a + 1) * c) for x, a, c in zip(g, lo, cs, strict=True)
            )
            out[g] = np.array(block[sub])  # own copy: the block is freed after this read
        return out

    def _geometry(self, view, name: str) -> tuple[tuple[int, ...], tuple[int, ...], np.dtype]:
        """(shape, inner chunk shape, dtype) of the array."""
        reader, arr = self._source(view, name)
        if reader is not None:
            return reader.shape, reader.chunk, reader.dtype
        return tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype)

    def pieces(self, view, name: str, roi: tuple[slice, ...]) -> list[Piece]:
        """Decoded chunks covering ``roi`` as (chunk, src slices in it, dst slices in the roi).

        ``roi`` is clipped to the array. The chunks are shared with the cache: read
        them, never write to them.
        """
        shape, cs, _ = self._geometry(view, name)
        roi = tuple(slice(*s.indices(n)[:2]) for s, n in zip(roi, shape, strict=True))
        if any(s.stop <= s.start for s in roi):
            return []
        ranges = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in zip(roi, cs, strict=True)]
        base = (view.scan_id, name)
        grid = list(itertools.product(*ranges))
        have = {g: self._chunks.get(base + g) for g in grid}
        missing = [g for g in grid if have[g] is None]
        self.hits += len(grid) - len(missing)
        self.misses += len(missing)
        if missing:
            fetched = self._fetch(view, name, missing)
            have.update(fetched)
            if self.max_bytes > 0:
                for g, chunk in fetched.items():
                    self._chunks[base + g] = chunk
                    self.nbytes += chunk.nbytes
        out = []
        for g in grid:
            if self.max_bytes > 0:
                self._chunks.move_to_end(base + g)
            src, dst = [], []
            for x, c, s in zip(g, cs, roi, strict=True):
                a, b = max(s.start, x * c), min(s.stop, (x + 1) * c)
                src.append(slice(a - x * c, b - x * c))
                dst.append(slice(a - s.start, b - s.start))
            out.append((have[g], tuple(src), tuple(dst)))
        while self.nbytes > self.max_bytes and len(self._chunks) > 1:
            _, old = self._chunks.popitem(last=False)
            self.nbytes -= old.nbytes
        return out

    def read(self, view, name: str, roi: tuple[slice, ...]) -> np.ndarray:
        """``roi`` of the array (clipped to it) as a new array, assembled from ``pieces``."""
        shape, _, dtype = self._geometry(view, name)
        roi = tuple(slice(*s.indices(n)[:2]) for s, n in zip(roi, shape, strict=True))
        out = np.empty(tuple(max(s.stop - s.start, 0) for s in roi), dtype=dtype)
        for chunk, src, dst in self.pieces(view, name, roi):
            out[dst] = chunk[src]
        return out
