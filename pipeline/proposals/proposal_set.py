"""ProposalSet: thousands of 3D mask proposals held compactly as label-map layers.

Dense masks do not scale (thousands of full-volume booleans per scan), so a
proposal is stored as a *union of label intervals* ``[start, stop)`` inside one
*layer*, an integer partition of the scan (label 0 = unlabelled).  Generators
number their labels so that every proposal is a contiguous interval (merge-tree
leaves are numbered in depth-first order, so every tree node is one interval),
which makes membership, voxel counts and features O(1) per proposal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Per-proposal columns every ProposalSet carries (features are filled by
#: :func:`pipeline.proposals.features.compute_features`).
BASE_COLUMNS = ("source", "layer", "level")
FEATURE_COLUMNS = ("voxels", "bbox", "centroid", "compactness", "contrast")


@dataclass
class ProposalSet:
    """Proposals of one scan: layers + CSR member intervals + per-proposal table.

    ``table`` columns: ``source`` (str), ``layer`` (int16 index into
    ``layer_names``), ``level`` (int16: merge-tree height, window index, ...),
    and, once computed, ``voxels`` (int64), ``bbox`` (N,6 int32 x0,y0,z0,x1,y1,z1
    end-exclusive), ``centroid`` (N,3 float32 voxel coords), ``compactness``
    (float32 sphericity in 0..1) and ``contrast`` (float32, inside minus
    surroundings mean intensity).
    """

    shape: tuple[int, int, int]
    layers: dict[str, np.ndarray]
    indptr: np.ndarray
    starts: np.ndarray
    stops: np.ndarray
    table: dict[str, np.ndarray]
    layer_info: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.indptr = np.asarray(self.indptr, dtype=np.int64)
        self.starts = np.asarray(self.starts, dtype=np.int64)
        self.stops = np.asarray(self.stops, dtype=np.int64)
        n = len(self.indptr) - 1
        self.table = dict(self.table)
        self.table["source"] = np.asarray(self.table.get("source", np.zeros(n, "U1")), dtype=str)
        self.table["layer"] = np.asarray(self.table.get("layer", np.zeros(n)), dtype=np.int16)
        self.table["level"] = np.asarray(self.table.get("level", np.zeros(n)), dtype=np.int16)
        self.validate()

    # ------------------------------------------------------------------ basics
    @property
    def count(self) -> int:
        return len(self.indptr) - 1

    def __len__(self) -> int:
        return self.count

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def has_features(self) -> bool:
        return all(c in self.table for c in FEATURE_COLUMNS)

    def validate(self) -> None:
        """Raise ValueError when the arrays are inconsistent (cheap checks only)."""
        n = self.count
        if n < 0 or self.indptr[0] != 0 or np.any(np.diff(self.indptr) < 1):
            raise ValueError("indptr must start at 0 and give every proposal >= 1 interval")
        if self.indptr[-1] != len(self.starts) or len(self.starts) != len(self.stops):
            raise ValueError("indptr[-1] must equal the number of member intervals")
        if len(self.starts) and np.any(self.stops <= self.starts) or np.any(self.starts < 1):
            raise ValueError("member intervals must be non-empty and start at label >= 1")
        for name, lay in self.layers.items():
            if lay.shape != self.shape:
                raise ValueError(f"layer {name!r} has shape {lay.shape}, expected {self.shape}")
            if not np.issubdtype(lay.dtype, np.integer):
                raise ValueError(f"layer {name!r} must be an integer label map")
        for col, arr in self.table.items():
            if len(arr) != n:
                raise ValueError(f"table column {col!r} has {len(arr)} rows, expected {n}")
        if n and (self.table["layer"].min() < 0 or self.table["layer"].max() >= len(self.layers)):
            raise ValueError("table['layer'] refers to a missing layer")

    @classmethod
    def empty(cls, shape: Sequence[int]) -> ProposalSet:
        """A valid set with no proposals (e.g. for an empty body mask)."""
        return cls(tuple(shape), {}, np.zeros(1, np.int64), np.zeros(0), np.zeros(0), {})

    @classmethod
    def from_intervals(
        cls,
        shape: Sequence[int],
        layer_name: str,
        layer: np.ndarray,
        starts: np.ndarray,
        stops: np.ndarray,
        source: str,
        level: np.ndarray | int = 0,
        layer_info: dict | None = None,
    ) -> ProposalSet:
        """One layer, one interval per proposal (what most generators produce)."""
        n = len(starts)
        return cls(
            tuple(shape),
            {layer_name: layer},
            np.arange(n + 1, dtype=np.int64),
            np.asarray(starts),
            np.asarray(stops),
            {
                "source": np.full(n, source),
                "layer": np.zeros(n, np.int16),
                "level": np.broadcast_to(np.asarray(level, np.int16), (n,)).copy(),
            },
            {layer_name: dict(layer_info or {})},
        )

    # -------------------------------------------------------------- decoding
    def members(self, i: int) -> list[tuple[int, int]]:
        """The label intervals ``[(start, stop), ...]`` of proposal ``i``."""
        a, b = self.indptr[i], self.indptr[i + 1]
        return list(zip(self.starts[a:b].tolist(), self.stops[a:b].tolist(), strict=True))

    def label_lut(self, i: int) -> np.ndarray:
        """Boolean lookup over the labels of proposal ``i``'s layer."""
        lay = self.layers[self.layer_names[int(self.table["layer"][i])]]
        size = max(int(lay.max(initial=0)), int(self.stops[self.indptr[i + 1] - 1])) + 1
        lut = np.zeros(size + 1, dtype=bool)
        for a, b in self.members(i):
            lut[a:b] = True
        return lut

    def mask(self, i: int) -> np.ndarray:
        """Full-volume boolean mask of proposal ``i`` (for tests and small volumes)."""
        lay = self.layers[self.layer_names[int(self.table["layer"][i])]]
        return self.label_lut(i)[lay]

    def masks(self, ids: Iterable[int]) -> np.ndarray:
        """Stack of full-volume masks, shape (K, *shape)."""
        ids = list(ids)
        if not ids:
            return np.zeros((0, *self.shape), dtype=bool)
        return np.stack([self.mask(int(i)) for i in ids])

    # ------------------------------------------------------------- combining
    def subset(self, ids: np.ndarray | Sequence[int]) -> ProposalSet:
        """Keep proposals ``ids`` (in that order); drop layers no longer used."""
        ids = np.asarray(ids, dtype=np.int64)
        lens = self.indptr[ids + 1] - self.indptr[ids]
        indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        rows = (
            np.concatenate([np.arange(self.indptr[i], self.indptr[i + 1]) for i in ids])
            if len(ids)
            else np.zeros(0, np.int64)
        )
        table = {k: v[ids] for k, v in self.table.items()}
        used = np.unique(table["layer"])
        names = [self.layer_names[j] for j in used]
        remap = np.full(len(self.layers) + 1, -1, np.int16)
        remap[used] = np.arange(len(used))
        table["layer"] = remap[table["layer"]]
        return ProposalSet(
            self.shape,
            {n: self.layers[n] for n in names},
            indptr,
            self.starts[rows],
            self.stops[rows],
            table,
            {n: self.layer_info.get(n, {}) for n in names},
        )

    def prune_layers(self) -> ProposalSet:
        """Coarsest layers that still rebuild every proposal exactly (order kept).

        Labels no proposal uses become 0, and each run of consecutive labels
        that no interval boundary separates (the same proposals hold all of
        them) becomes one label: only the cut points of the member intervals
        matter.  Fewer distinct labels cost far fewer bytes on disk; a monotone
        renumbering keeps every member interval an interval.
        """
        layers, starts, stops = {}, self.starts.copy(), self.stops.copy()
        row_layer = np.repeat(self.table["layer"], np.diff(self.indptr))
        for j, name in enumerate(self.layer_names):
            lay = self.layers[name]
            rows = row_layer == j
            top = max(int(lay.max(initial=0)), int(self.stops[rows].max(initial=1)))
            cuts = np.unique(np.concatenate([self.starts[rows], self.stops[rows]]))
            cover = np.zeros(len(cuts) + 1, np.int64)  # segment k = [cuts[k], cuts[k + 1])
            np.add.at(cover, np.searchsorted(cuts, self.starts[rows]), 1)
            np.add.at(cover, np.searchsorted(cuts, self.stops[rows]), -1)
            covered = np.cumsum(cover)[: max(len(cuts) - 1, 0)] > 0
            rank = np.cumsum(covered) * covered  # new label of each segment (0: unused)
            seg = np.searchsorted(cuts, np.arange(top + 1), side="right") - 1
            newlab = np.zeros(top + 1, np.int64)
            inside = (seg >= 0) & (seg < len(rank))
            newlab[inside] = rank[seg[inside]]
            newlab[0] = 0
            dtype = np.uint16 if newlab.max(initial=0) < 65535 else np.int32
            layers[name] = newlab.astype(dtype)[lay]
            starts[rows] = rank[np.searchsorted(cuts, self.starts[rows])]
            stops[rows] = rank[np.searchsorted(cuts, self.stops[rows]) - 1] + 1
        return ProposalSet(
            self.shape, layers, self.indptr, starts, stops, self.table, dict(self.layer_info)
        )


def merge_sets(sets: Sequence[ProposalSet]) -> ProposalSet:
    """Concatenate ProposalSets of the same scan (layer name clashes get a suffix)."""
    sets = [s for s in sets if s is not None]
    if not sets:
        raise ValueError("merge_sets needs at least one ProposalSet")
    shape = sets[0].shape
    layers: dict[str, np.ndarray] = {}
    info: dict[str, dict] = {}
    indptrs, starts, stops, tables = [np.zeros(1, np.int64)], [], [], []
    offset = 0
    for s in sets:
        if s.shape != shape:
            raise ValueError(f"cannot merge proposals of shape {s.shape} into {shape}")
        base = len(layers)
        for name in s.layer_names:
            new, k = name, 2
            while new in layers:
                new, k = f"{name}_{k}", k + 1
            layers[new] = s.layers[name]
            info[new] = s.layer_info.get(name, {})
        t = dict(s.table)
        t["layer"] = t["layer"].astype(np.int16) + base
        tables.append(t)
        indptrs.append(s.indptr[1:] + offset)
        offset += int(s.indptr[-1])
        starts.append(s.starts)
        stops.append(s.stops)
    cols = set.intersection(*(set(t) for t in tables)) if tables else set()
    table = {c: np.concatenate([t[c] for t in tables]) for c in cols}
    return ProposalSet(
        shape,
        layers,
        np.concatenate(indptrs),
        np.concatenate(starts),
        np.concatenate(stops),
        table,
        info,
    )
