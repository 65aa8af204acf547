"""Rebuild K proposal masks inside a crop as one int32 bit field, reading each layer once.

A proposal is a set of label intervals of one label-map layer (the bank's
proposal format). For a crop we read each *needed* layer's ROI once through
``ScanView.read`` and build a per-layer lookup table label -> bits of the chosen
proposals, so the K masks cost one table lookup per layer instead of K full
passes plus packing. The same layer blocks also give every proposal's voxel
count in the reference crop (bincount + CSR prefix sums), so choosing K
visible proposals needs no second read.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from bank.chunk_reader import ShardedBloscReader, local_member
from train import cpu_kernels

LAYERS_PATH = "proposals/layers/"
# (decoded chunk, slices of it, slices of the destination they fill)
Piece = tuple[np.ndarray, tuple[slice, ...], tuple[slice, ...]]


def _histogram(labels: np.ndarray, n: int) -> np.ndarray:
    """bincount of a label block; torch's int16 bincount is ~2x numpy's (which widens to intp).

    A binary layer (labels 0/1, e.g. one thresholded region) is counted with
    ``count_nonzero``: ~20x cheaper than any bincount.
    """
    if n <= 3 and labels.size and labels.dtype.kind in "ui" and labels.max() <= 1:
        nnz = np.count_nonzero(labels)
        out = np.zeros(max(n, 2), np.int64)
        out[0], out[1] = labels.size - nnz, nnz
        return out
    if labels.dtype == np.uint16 and labels.ndim == 3:
        hist = cpu_kernels.hist_u16(labels, n)  # compiled, strided: ~2x torch's, no copy
        if hist is not None:
            return hist
    if labels.dtype == np.uint16 and n <= 2**15:
        flat = torch.from_numpy(np.ascontiguousarray(labels).view(np.int16)).ravel()
        return torch.bincount(flat, minlength=n).numpy()
    return np.bincount(labels.ravel(), minlength=n)


class ProposalIndex:
    """Plain-numpy view of a ProposalReader's CSR and table (what the sampler needs)."""

    def __init__(self, reader) -> None:
        self.layer_names: list[str] = list(reader.layer_names)
        self.layer_sizes = [int(s) for s in reader.attrs["layer_sizes"]]
        self.indptr = np.asarray(reader.indptr, np.int64)
        self.starts = np.asarray(reader.starts, np.int64)
        self.stops = np.asarray(reader.stops, np.int64)
        self.layer = np.asarray(reader.table["layer"], np.int64)
        self.bbox = np.asarray(reader.table["bbox"], np.int64)
        self.centroid = np.asarray(reader.table["centroid"], np.float64)
        self.count = len(self.indptr) - 1
        self.row_layer = np.repeat(self.layer, np.diff(self.indptr))

    def bbox_overlap(self, roi) -> np.ndarray:
        """Upper bound of each proposal's voxels inside roi, from its bounding box."""
        lo = np.array([r.start for r in roi])
        hi = np.array([r.stop for r in roi])
        ext = np.clip(np.minimum(self.bbox[:, 3:], hi) - np.maximum(self.bbox[:, :3], lo), 0, None)
        return ext.prod(axis=1)

    def read_layers(
        self, view, roi, layers, cache: ChunkCache | None = None
    ) -> dict[int, np.ndarray]:
        read = view.read if cache is None else (lambda name, r: cache.read(view, name, r))
        return {int(j): np.asarray(read(LAYERS_PATH + self.layer_names[j], roi)) for j in layers}

    def counts(self, blocks: dict[int, np.ndarray], window) -> np.ndarray:
        """Voxels of every proposal inside ``window`` (slices into the blocks); 0 for unread layers."""
        return self._counts(
            {j: _histogram(b[window], self.layer_sizes[j] + 1) for j, b in blocks.items()}
        )

    def counts_in_pieces(self, layer_pieces: dict[int, list[Piece]]) -> np.ndarray:
        """``counts`` over the region the pieces cover, histogramming chunk piece by piece.

        Saves assembling each layer's block: the pieces are small (<= one chunk), so their
        contiguous copies stay in cache and reuse freed memory.
        """
        hists = {}
        for j, pieces in layer_pieces.items():
            total = np.zeros(self.layer_sizes[j] + 1, np.int64)
            for chunk, src, _ in pieces:
                h = _histogram(chunk[src], len(total))
                if len(h) > len(total):
                    total = np.concatenate([total, np.zeros(len(h) - len(total), np.int64)])
                total[: len(h)] += h
            hists[j] = total
        return self._counts(hists)

    def _counts(self, hists: dict[int, np.ndarray]) -> np.ndarray:
        rows_val = np.zeros(len(self.starts), np.int64)
        for j, hist in hists.items():
            prefix = np.concatenate([[0], np.cumsum(hist)])
            rows = self.row_layer == j
            stops = np.minimum(self.stops[rows], len(hist))
            rows_val[rows] = prefix[stops] - prefix[np.minimum(self.starts[rows], stops)]
        if not len(rows_val):
            return np.zeros(self.count, np.int64)
        nonempty = np.diff(self.indptr) > 0
        out = np.zeros(self.count, np.int64)
        out[nonempty] = np.add.reduceat(rows_val, self.indptr[:-1][nonempty])
        return out

    def bits(
        self,
        layer_pieces: dict[int, list[Piece]],
        ids: np.ndarray,
        shape,
        base: int = 0,
        origin=(0, 0, 0),
        dtype=np.int32,
    ) -> np.ndarray:
        """Bit field: ``base`` | bit k where proposal ids[k] is, from each layer's pieces.

        ``dtype`` must hold every bit used (uint16 up to 16: ~20% cheaper lookups than int32).

        The lookup runs chunk piece by chunk piece straight into the field (``dst``
        of a piece + ``origin`` = its voxel position in the scan), so layers are
        never assembled into blocks, and a piece that no chosen proposal's bounding
        box reaches is skipped: it cannot hold any of their labels.
        """
        dtype = np.dtype(dtype)
        if max(len(ids), int(base).bit_length()) > 8 * dtype.itemsize - (dtype.kind == "i"):
            raise ValueError(f"{len(ids)} proposals and base {base} do not fit in {dtype}")
        out = np.full(shape, base, dtype)
        origin = np.asarray(origin, np.int64)
        for j in np.unique(self.layer[ids]):
            chosen = np.flatnonzero(self.layer[ids] == j)
            lut = np.zeros(self.layer_sizes[j] + 1, dtype)
            for k in chosen:
                i = ids[k]
                for r in range(self.indptr[i], self.indptr[i + 1]):
                    lut[self.starts[r] : self.stops[r]] |= dtype.type(1 << int(k))
            box = self.bbox[ids[chosen]]  # (m, 6): lo xyz, hi xyz (exclusive)
            # Without the compiled lookup: a binary layer (labels 0/1) with label 0 in no chosen
            # proposal gives bits = label * lut[1], a multiply instead of a table gather.
            binary = 2 <= len(lut) <= 3 and lut[0] == 0 and not lut[2:].any()
            pieces = layer_pieces[int(j)]
            if not pieces:
                continue
            # Which pieces some chosen box reaches, for all pieces of the layer at once.
            lo = origin + np.array([[d.start for d in dst] for _, _, dst in pieces])
            hi = origin + np.array([[d.stop for d in dst] for _, _, dst in pieces])
            reach = ((box[None, :, :3] < hi[:, None]) & (box[None, :, 3:] > lo[:, None])).all(2)
            for (chunk, src, dst), hit in zip(pieces, reach.any(1), strict=True):
                if not hit:
                    continue
                piece = chunk[src]
                if cpu_kernels.lut_or_u16(piece, lut, out[dst]):  # compiled: one pass
                    continue
                if binary and piece.dtype.kind in "ui" and piece.max(initial=0) <= 1:
                    out[dst] |= piece.astype(dtype, copy=False) * lut[1]
                else:
                    out[dst] |= lut[piece]
        return out


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
        shape, _, dtype = self._geometry(view, name)
        roi = tuple(slice(*s.indices(n)[:2]) for s, n in zip(roi, shape, strict=True))
        out = np.empty(tuple(max(s.stop - s.start, 0) for s in roi), dtype=dtype)
        for chunk, src, dst in self.pieces(view, name, roi):
            out[dst] = chunk[src]
        return out


def crop_pieces(pieces: list[Piece], box: tuple[slice, ...]) -> list[Piece]:
    """The part of ``pieces`` (dst in some roi) inside ``box`` (slices of that roi), dst in box."""
    out = []
    for chunk, src, dst in pieces:
        s2, d2 = [], []
        for s, d, b in zip(src, dst, box, strict=True):
            lo, hi = max(d.start, b.start), min(d.stop, b.stop)
            if hi <= lo:
                break
            s2.append(slice(s.start + lo - d.start, s.start + hi - d.start))
            d2.append(slice(lo - b.start, hi - b.start))
        else:
            out.append((chunk, tuple(s2), tuple(d2)))
    return out


def pieces_min(pieces: list[Piece]) -> float:
    """Minimum over the pieces (torch's min: ~50x numpy's on float16)."""
    return min(float(torch.from_numpy(chunk[src]).min()) for chunk, src, _ in pieces)
