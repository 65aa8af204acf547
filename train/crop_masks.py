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

import numpy as np
import torch

LAYERS_PATH = "proposals/layers/"


def _histogram(labels: np.ndarray, n: int) -> np.ndarray:
    """bincount of a label block; torch's int16 bincount is ~2x numpy's (which widens to intp)."""
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
        rows_val = np.zeros(len(self.starts), np.int64)
        for j, block in blocks.items():
            hist = _histogram(block[window], self.layer_sizes[j] + 1)
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

    def bits(self, blocks: dict[int, np.ndarray], ids: np.ndarray, shape) -> np.ndarray:
        """int32 field with bit k set where proposal ids[k] is, from already-read layer blocks."""
        out = np.zeros(shape, np.int32)
        for j in np.unique(self.layer[ids]):
            lut = np.zeros(self.layer_sizes[j] + 1, np.int32)
            for k in np.flatnonzero(self.layer[ids] == j):
                i = ids[k]
                for r in range(self.indptr[i], self.indptr[i + 1]):
                    lut[self.starts[r] : self.stops[r]] |= np.int32(1 << int(k))
            out |= lut[blocks[int(j)]]
        return out


class ChunkCache:
    """Per-process LRU of decoded chunks, so overlapping reads decode each chunk once.

    Why: consecutive pairs often come from the same scan (always so with
    ``pairs_per_scan_visit > 1``, and in small banks), and their boxes overlap;
    decompressing the same 64^3 chunks again dominates the read. A read asks the
    store once for the chunk-aligned bounding box of the chunks it lacks, splits
    it into chunks, and assembles the ROI from the cache. Bounded by ``max_bytes``
    (0 disables caching: plain ``ScanView.read``). Results equal ``ScanView.read``.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._chunks: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def clear(self) -> None:
        self._chunks.clear()
        self.nbytes = 0

    def read(self, view, name: str, roi: tuple[slice, ...]) -> np.ndarray:
        if self.max_bytes <= 0:
            return np.asarray(view.read(name, roi))
        arr = view.array(name)
        shape, cs = tuple(arr.shape), tuple(arr.chunks)
        roi = tuple(slice(*s.indices(n)[:2]) for s, n in zip(roi, shape, strict=True))
        out = np.empty(tuple(max(s.stop - s.start, 0) for s in roi), dtype=arr.dtype)
        if 0 in out.shape:
            return out
        ranges = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in zip(roi, cs, strict=True)]
        base = (view.scan_id, name)
        missing = [g for g in itertools.product(*ranges) if base + g not in self._chunks]
        self.hits += int(np.prod([len(r) for r in ranges])) - len(missing)
        self.misses += len(missing)
        if missing:
            lo = np.min(missing, axis=0)
            hi = np.max(missing, axis=0) + 1
            box = tuple(
                slice(int(a) * c, min(int(b) * c, n))
                for a, b, c, n in zip(lo, hi, cs, shape, strict=True)
            )
            block = np.asarray(view.read(name, box))
            for g in itertools.product(*(range(a, b) for a, b in zip(lo, hi, strict=True))):
                key = base + tuple(int(x) for x in g)
                if key in self._chunks:
                    continue
                sub = tuple(
                    slice((x - a) * c, (x - a + 1) * c) for x, a, c in zip(g, lo, cs, strict=True)
                )
                chunk = np.array(block[sub])  # own copy: the block is freed after this read
                self._chunks[key] = chunk
                self.nbytes += chunk.nbytes
        for g in itertools.product(*ranges):
            key = base + g
            chunk = self._chunks[key]
            self._chunks.move_to_end(key)
            src, dst = [], []
            for x, c, s in zip(g, cs, roi, strict=True):
                a, b = max(s.start, x * c), min(s.stop, (x + 1) * c)
                src.append(slice(a - x * c, b - x * c))
                dst.append(slice(a - s.start, b - s.start))
            out[tuple(dst)] = chunk[tuple(src)]
        while self.nbytes > self.max_bytes and len(self._chunks) > 1:
            _, old = self._chunks.popitem(last=False)
            self.nbytes -= old.nbytes
        return out
