"""Rebuild K proposal masks inside a crop as one bit field, reading each layer once.

A proposal is a set of label intervals of one label-map layer (the bank's
proposal format). The sampler takes each *needed* layer of a crop as decoded
chunk pieces from the bank's ``ChunkCache`` (``cache.pieces``; a chunk is decoded
once and kept for the next overlapping crop), never as an assembled block.
``ProposalIndex.counts_in_pieces`` histograms the pieces into every proposal's voxel
count in the reference crop (CSR prefix sums over the label intervals), so choosing
K visible proposals needs no second read; ``ProposalIndex.bits`` builds one lookup
table per layer, label -> bits of the chosen proposals, and applies it piece by
piece straight into the field (int32, or a narrower type the K + 1 bits fit), so the
K masks cost one table lookup per layer instead of K full passes plus packing.
``read_layers`` and ``counts`` do the same on whole blocks (``ScanView.read`` or a
``ChunkCache``), for callers that want blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from maskbank.bank.sampling import ChunkCache, Piece, proposal_layer_array
from maskbank.train.kernels import labels as label_loops

# Prefix of a layer's array name (``ProposalIndex.layer_arrays`` holds the whole names).
LAYERS_PATH = proposal_layer_array("")


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
        hist = label_loops.label_histogram(labels, n)  # compiled, strided: ~2x torch's, no copy
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
        self.layer_sizes = [int(s) for s in reader.layer_sizes]
        # array names of the layers in the scan, for ScanView.read and ChunkCache
        self.layer_arrays = [reader.layer_array_name(j) for j in range(len(self.layer_names))]
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
        return {int(j): np.asarray(read(self.layer_arrays[j], roi)) for j in layers}

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
                label_loops.or_lookup(chunk[src], lut, out[dst])  # compiled: one pass, no copy
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
