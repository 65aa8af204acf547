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

import numpy as np

LAYERS_PATH = "proposals/layers/"


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

    def read_layers(self, view, roi, layers) -> dict[int, np.ndarray]:
        return {
            int(j): np.asarray(view.read(LAYERS_PATH + self.layer_names[j], roi)) for j in layers
        }

    def counts(self, blocks: dict[int, np.ndarray], window) -> np.ndarray:
        """Voxels of every proposal inside ``window`` (slices into the blocks); 0 for unread layers."""
        rows_val = np.zeros(len(self.starts), np.int64)
        for j, block in blocks.items():
            hist = np.bincount(block[window].ravel(), minlength=self.layer_sizes[j] + 1)
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
