"""Store a scan's mask proposals compactly and rebuild any K of them in a region.

Layout under ``scans/<id>/proposals/`` (see docs/bank-format.md, "Proposals"):
``layers/<name>`` label-map volumes (uint16/int32), ``members_indptr`` +
``members_start`` + ``members_stop`` (CSR of label intervals per proposal) and
``table/<column>`` per-proposal features.  Rebuilding K masks in a ROI reads
each touched layer's ROI once and indexes a per-proposal label lookup table, so
no other proposal is ever decoded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from .encoding import Encoding
from .errors import BankError
from .groups import fill_group
from .jsonable import to_jsonable
from .layout import (
    DEFAULT_SET,
    PROPOSAL_LAYERS_DIR,
    PROPOSALS_PART,
    check_array_name,
    check_set_name,
    proposal_layer_array,
    proposals_part,
)

PROPOSALS_FORMAT = "maskbank-proposals/1"
#: What `proposal_nbytes` records as the part's ``scan_token``: a scan token is 24 hex
#: digits, that of a scan older than tokens its ``written_at`` (27 characters).
_TOKEN_AT_ITS_LONGEST = "0" * 32
__all__ = [
    "DEFAULT_SET",
    "NoProposalsError",
    "ProposalReader",
    "check_set_name",
    "masks_to_labels",
    "proposal_nbytes",
    "write_proposals",
]
_TABLE_DTYPES = {
    "layer": np.int16,
    "level": np.int16,
    "voxels": np.int64,
    "bbox": np.int32,
    "centroid": np.float32,
    "compactness": np.float32,
    "contrast": np.float32,
}

_WIDTHS = {"bbox": 6, "centroid": 3}


class NoProposalsError(BankError, KeyError):
    """The scan has no proposals part (of the set asked for) yet."""

    def __str__(self) -> str:
        return str(self.args[0])


def write_proposals(
    bank: Any,
    scan_id: str,
    proposal_set: Any,
    attrs: dict | None = None,
    scan_token: str | None = None,
    name: str = DEFAULT_SET,
) -> dict:
    """Write ``proposal_set`` (a pipeline ProposalSet) as the scan's proposal set ``name``.

    Each named set is a part of its own (``proposals`` for the default set,
    ``proposals-<name>`` otherwise), written atomically without touching the others.

    The bank stores what it is given: the set carries its feature columns
    (``voxels``, ``bbox``, ``centroid``, ``compactness``, ``contrast``), computed by
    the caller with ``pipeline.proposals.features.compute_features``
    (``generate_proposals`` does so).

    ``scan_token`` is ``ScanView.token`` of the scan the proposals were made from: when
    the scan was rewritten since, StaleScanError is raised and nothing is written.

    Layers are pruned to the labels some proposal uses and renumbered densely
    (uint16 when possible) so they compress well. Returns the attrs.
    """
    ps, arrays, meta = _stored_part(proposal_set, attrs, name)
    bank.write_scan(scan_id, arrays, meta, part=proposals_part(name), scan_token=scan_token)
    return meta


def _stored_part(
    proposal_set: Any, attrs: dict | None, name: str
) -> tuple[Any, dict[str, np.ndarray], dict]:
    """(the pruned set, the arrays and the attributes) of a set as it is stored."""
    proposals_part(name)  # checks the set name
    ps = proposal_set
    if not ps.has_features:
        raise ValueError(
            "write_proposals stores the features it is given and this set has none: compute "
            "them first with pipeline.proposals.features.compute_features(ps, image, body, "
            "spacing) (generate_proposals does so)"
        )
    ps = ps.prune_layers()
    arrays, sources = _proposal_arrays(ps)
    meta = {
        "format": PROPOSALS_FORMAT,
        "count": ps.count,
        "n_proposals": ps.count,
        "shape": list(ps.shape),
        "layers": ps.layer_names,
        "layer_sizes": [int(lay.max(initial=0)) + 1 for lay in ps.layers.values()],
        "layer_info": {k: dict(v) for k, v in ps.layer_info.items()},
        "sources": sources,
        "columns": [c for c in ps.table if c == "source" or f"table/{c}" in arrays],
    }
    meta.update(attrs or {})
    meta["proposal_set"] = name
    return ps, arrays, meta


def _proposal_arrays(ps: Any) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays a (pruned) proposal set is stored as, and its source names."""
    sources = sorted(set(ps.table["source"].tolist()))
    codes = {s: i for i, s in enumerate(sources)}
    arrays: dict[str, np.ndarray] = {
        "members_indptr": ps.indptr.astype(np.int64),
        "members_start": ps.starts.astype(np.int32),
        "members_stop": ps.stops.astype(np.int32),
        "table/source": np.array([codes[s] for s in ps.table["source"]], np.uint8).reshape(-1),
    }
    for layer_name, lay in ps.layers.items():
        arrays[f"{PROPOSAL_LAYERS_DIR}/{layer_name}"] = lay
    for col, values in ps.table.items():
        if col == "source":
            continue
        arr = np.asarray(values)
        if arr.dtype.kind not in "biuf":
            continue
        arr = arr.astype(_TABLE_DTYPES.get(col, arr.dtype))
        # zero-row 2-D arrays are stored flat (the reader restores the width)
        arrays[f"table/{col}"] = arr.reshape(-1) if arr.size == 0 else arr
    return arrays, sources


def proposal_nbytes(
    proposal_set: Any,
    encoding: Encoding | None = None,
    attrs: dict | None = None,
    name: str = DEFAULT_SET,
) -> dict[str, int]:
    """Bytes the set will take on storage: ``{layer name: bytes}`` plus ``"": the rest``.

    The whole part is written in memory exactly as ``write_proposals`` stores it (same
    pruning, dtypes, chunks, codecs, metadata; ``encoding`` is the bank's, default
    ``Encoding()``) and every object counted, its own and its arrays' ``zarr.json``
    included, so the sum is what ``Bank.stored_nbytes(id, part)`` and the index's
    ``proposals_nbytes`` report once it is written. Pass the ``attrs`` the writer will
    store (values whose final form is not known yet at their longest): they are bytes
    too, and on a small set not few. A writer holds its per-proposal byte budget on this
    before it publishes.
    """
    ps, arrays, meta = _stored_part(proposal_set, attrs, name)
    part = proposals_part(name)
    objects: dict[str, Any] = {}
    group = zarr.open_group(zarr.storage.MemoryStore(objects), mode="w-", zarr_format=3)
    arrays = {check_array_name(k): np.asarray(v) for k, v in arrays.items()}
    fill_group(
        group,
        arrays,
        to_jsonable(meta),
        part,
        _TOKEN_AT_ITS_LONGEST,
        tuple(ps.shape),
        encoding or Encoding(),
    )
    out = dict.fromkeys(ps.layer_names, 0) | {"": 0}
    prefix = f"{PROPOSAL_LAYERS_DIR}/"
    for key, value in objects.items():
        layer = key[len(prefix) :].split("/", 1) if key.startswith(prefix) else None
        owner = layer[0] if layer and len(layer) == 2 and layer[0] in out else ""
        out[owner] += len(value)
    return out


def masks_to_labels(masks: np.ndarray, dtype: Any = None) -> np.ndarray:
    """K boolean masks as one label map 1..K in their order (a later mask wins an overlap).

    For overlays and exports, which show several proposals in one volume. ``dtype``
    defaults to the smallest unsigned type that holds K.
    """
    if dtype is None:
        dtype = np.uint8 if len(masks) < 256 else np.uint16
    out = np.zeros(masks.shape[1:], dtype=dtype)
    for k, mask in enumerate(masks, start=1):
        out[mask] = k
    return out


def _norm_roi(roi, shape) -> tuple[slice, slice, slice]:
    if roi is None:
        return tuple(slice(0, n) for n in shape)
    if len(roi) != 3:
        raise ValueError(f"roi must be 3 slices, got {roi!r}")
    out = []
    for s, n in zip(roi, shape, strict=True):
        a, b, step = s.indices(n)
        if step != 1:
            raise ValueError("roi slices must have step 1")
        out.append(slice(a, max(a, b)))
    return tuple(out)


def _member_names(attrs: dict) -> list[str]:
    return ["members_indptr", "members_start", "members_stop"] + [
        f"table/{c}" for c in attrs["columns"]
    ]


def _read_part_local(
    group: Any, part: str = PROPOSALS_PART
) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(attrs, members and table columns) read straight from a local store, or None.

    None (the caller then reads through zarr) for any other store, a missing part or
    an array ``bank.chunk_reader.read_whole_local`` does not decode itself.
    """
    import json

    from .chunk_reader import local_member, read_whole_local

    where = local_member(group, part)
    if where is None:
        return None
    root, part = where
    try:
        attrs = json.loads((root / part / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return None
    attrs = attrs.get("attributes") or {}
    if attrs.get("format") != PROPOSALS_FORMAT:
        return None
    got = {}
    for name in _member_names(attrs):
        got[name] = read_whole_local(root, f"{part}/{name}")
        if got[name] is None:
            return None
    return attrs, got


async def _read_part(group: Any, part: str) -> tuple[dict | None, dict[str, np.ndarray | None]]:
    """(attrs or None without a proposals part, members and table columns or {}).

    Everything is opened and read concurrently in one event-loop round trip (each
    open and read through the synchronous API is a round trip of its own).
    """
    import asyncio

    try:
        g = await group.getitem(part)
    except KeyError:
        return None, {}
    attrs = dict(g.attrs)
    names = ["members_indptr"]
    if attrs.get("format") == PROPOSALS_FORMAT:
        names = _member_names(attrs)

    async def read(name: str) -> np.ndarray | None:
        try:
            arr = await g.getitem(name)
        except KeyError:
            return None
        return np.asarray(await arr.getitem(...))

    return attrs, dict(zip(names, await asyncio.gather(*map(read, names)), strict=True))


class ProposalReader:
    """Read side of a scan's proposals: table, per-ROI voxel counts and mask rebuilding.

    Opening one reads only the members and the table (the sampler opens one per scan it
    visits): on a local store straight from the files (~3 ms), elsewhere through zarr's
    async API in one round trip. Layers are opened when first read.
    """

    def __init__(self, scan: Any, name: str = DEFAULT_SET) -> None:
        from zarr.core.sync import sync

        scan_id = getattr(scan, "scan_id", None) or getattr(scan, "id", "?")
        self.name = name
        self._part = proposals_part(name)
        self._scan_group = scan.group
        self._part_group: Any = None
        fast = _read_part_local(scan.group, self._part)
        attrs, got = (
            fast if fast is not None else sync(_read_part(scan.group._async_group, self._part))
        )
        if attrs is None or got.get("members_indptr") is None:
            if name == DEFAULT_SET:
                how = "`maskbank propose BANK` or `maskbank prepare --proposals ...`"
            else:
                how = f"`maskbank propose BANK --name {name}`"
            has = sorted(getattr(scan, "proposal_sets", None) or [])
            raise NoProposalsError(
                f"scan {scan_id!r} has no proposals in set {name!r} (its sets: "
                f"{', '.join(map(repr, has)) or 'none'}); make them with {how}"
            )
        self.attrs: dict = attrs
        if self.attrs.get("format") != PROPOSALS_FORMAT:
            raise BankError(
                f"scan {scan_id!r}: unsupported proposals format {self.attrs.get('format')!r}"
            )
        for name in ("members_start", "members_stop"):
            if got.get(name) is None:
                raise BankError(f"scan {scan_id!r}: proposals array {name!r} is missing")
        self.shape = tuple(self.attrs["shape"])
        self.layer_names: list[str] = list(self.attrs["layers"])
        self._layers: dict[int, Any] = {}
        self.layer_sizes = [int(s) for s in self.attrs["layer_sizes"]]
        self.indptr = np.asarray(got["members_indptr"], np.int64)
        self.starts = np.asarray(got["members_start"], np.int64)
        self.stops = np.asarray(got["members_stop"], np.int64)
        table: dict[str, np.ndarray] = {}
        sources = np.array(self.attrs["sources"] or [""], dtype=str)
        for col in self.attrs["columns"]:
            arr = got[f"table/{col}"]
            if arr is None:
                raise BankError(f"scan {scan_id!r}: proposals table column {col!r} is missing")
            if col == "source":
                arr = sources[arr.astype(np.intp)]
            elif col in _WIDTHS:
                arr = arr.reshape(-1, _WIDTHS[col])
            table[col] = arr
        self.table = table
        self._row_layer = np.repeat(table["layer"], np.diff(self.indptr)).astype(np.intp)

    @property
    def _group(self) -> Any:
        """The proposals zarr group (opened on first use)."""
        if self._part_group is None:
            self._part_group = self._scan_group[self._part]
        return self._part_group

    @property
    def count(self) -> int:
        return len(self.indptr) - 1

    def __len__(self) -> int:
        return self.count

    def nbytes_stored(self) -> int:
        """Bytes on storage of the whole part: every object under it (layers, members,
        table and their metadata), as ``Bank.stored_nbytes(id, part)`` and the index's
        ``proposals_nbytes`` count them and ``proposal_nbytes`` predicts them."""
        from zarr.core.sync import sync

        where = self._scan_group.store_path
        prefix = f"{where.path}/{self._part}" if where.path else self._part
        return int(sync(where.store.getsize_prefix(prefix)))

    def bytes_per_proposal(self) -> float:
        return self.nbytes_stored() / max(self.count, 1)

    # --------------------------------------------------------------- queries
    def layer_array_name(self, j: int) -> str:
        """Name of layer ``j``'s array relative to the scan, for ``ScanView.read`` and
        ``ChunkCache`` (which read any region of it without this reader)."""
        return proposal_layer_array(self.layer_names[j], self.name)

    def layer(self, j: int) -> Any:
        """Label-map layer ``j`` as a lazy zarr array (opened on first use)."""
        if j not in self._layers:
            self._layers[j] = self._group[f"{PROPOSAL_LAYERS_DIR}/{self.layer_names[j]}"]
        return self._layers[j]

    def _layer_roi(self, j: int, roi) -> np.ndarray:
        return np.asarray(self.layer(j)[roi]).astype(np.intp, copy=False)

    def _touches(self, roi) -> np.ndarray:
        """Which proposals' bounding boxes intersect roi."""
        bb = self.table["bbox"]
        lo = np.array([s.start for s in roi])
        hi = np.array([s.stop for s in roi])
        return np.all((bb[:, :3] < hi) & (bb[:, 3:] > lo), axis=1)

    def voxels_in_box(self, roi) -> np.ndarray:
        """Voxels of every proposal inside roi (tuple of 3 slices), int64 (N,)."""
        roi = _norm_roi(roi, self.shape)
        n = self.count
        out = np.zeros(n, np.int64)
        if n == 0 or any(s.stop <= s.start for s in roi):
            return out
        touch = self._touches(roi)
        rows_val = np.zeros(len(self.starts), np.int64)
        for j in np.unique(self.table["layer"][touch]):
            counts = np.bincount(
                self._layer_roi(int(j), roi).ravel(), minlength=self.layer_sizes[j]
            )
            prefix = np.concatenate([[0], np.cumsum(counts)])
            rows = self._row_layer == j
            stops = np.minimum(self.stops[rows], len(counts))
            rows_val[rows] = prefix[stops] - prefix[np.minimum(self.starts[rows], stops)]
        out = np.add.reduceat(rows_val, self.indptr[:-1]) if len(rows_val) else out
        return np.where(touch, out, 0).astype(np.int64)

    def masks(self, ids, roi=None) -> np.ndarray:
        """Boolean masks of proposals ``ids`` inside roi, shape (K, *roi_shape)."""
        roi = _norm_roi(roi, self.shape)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError(f"proposal ids must be in [0, {self.count}), got {ids.tolist()}")
        roi_shape = tuple(s.stop - s.start for s in roi)
        out = np.zeros((len(ids), *roi_shape), dtype=bool)
        if not len(ids) or 0 in roi_shape:
            return out
        touch = self._touches(roi)[ids]
        layer_of = self.table["layer"][ids]
        for j in np.unique(layer_of[touch]):
            lab = self._layer_roi(int(j), roi)
            for k in np.flatnonzero(touch & (layer_of == j)):
                i = ids[k]
                lut = np.zeros(self.layer_sizes[j] + 1, dtype=bool)
                for r in range(self.indptr[i], self.indptr[i + 1]):
                    lut[self.starts[r] : self.stops[r]] = True
                np.take(lut, lab, out=out[k])
        return out

    def mask(self, i: int) -> np.ndarray:
        """Full-volume boolean mask of proposal i."""
        return self.masks([i], None)[0]
