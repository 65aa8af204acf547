"""Read-only view of one scan in a bank: attributes, lazy arrays, region-of-interest reads."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .errors import BankError
from .layout import PROPOSALS_PART, check_array_name, proposals_part, set_of_part

if TYPE_CHECKING:
    from .bank import Bank
    from .lazy_array import LazyArray
    from .scan_opener import ScanOpener

Roi = tuple[slice, ...] | None


class ScanView:
    """One scan. Opening it reads one small zarr.json; arrays are opened on first use."""

    def __init__(self, bank: Bank | ScanOpener, scan_id: str, group: zarr.Group) -> None:
        self.bank = bank
        self.scan_id = scan_id
        self._group = group
        self._arrays: dict[str, zarr.Array] = {}

    def __reduce__(self):
        """Pickle as 'open this scan of this bank again' (arrays reopen lazily)."""
        return (_reopen_scan, (self.bank, self.scan_id))

    def __repr__(self) -> str:
        return (
            f"ScanView({self.scan_id!r}, shape={self.shape}, spacing={self.spacing}, "
            f"modality={self.modality!r}, dataset={self.dataset!r})"
        )

    @property
    def group(self) -> zarr.Group:
        """The scan's zarr.Group (read-only); for bank-internal readers such as bank.proposal_store."""
        return self._group

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """Caller attributes plus the bank's own under the 'maskbank' key."""
        return dict(self._group.attrs)

    @property
    def info(self) -> dict[str, Any]:
        """The bank's attributes: format_version, written_at, arrays {name: shape/dtype/...}."""
        return self.attrs.get("maskbank", {})

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.info["arrays"]["image"]["shape"])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.attrs["spacing"])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray | None:
        value = self.attrs.get("affine")
        return None if value is None else np.asarray(value, dtype=np.float64)

    @property
    def modality(self) -> str | None:
        return self.attrs.get("modality")

    @property
    def dataset(self) -> str | None:
        return self.attrs.get("dataset")

    @property
    def label_names(self) -> dict[int, str]:
        """Names of the label map's values present in this scan ({} when none were given)."""
        return {int(k): str(v) for k, v in (self.attrs.get("label_names") or {}).items()}

    @property
    def metadata(self) -> dict[str, str]:
        """Scan-level metadata from the manifest's other columns (e.g. a diagnosis), or {}."""
        return {str(k): str(v) for k, v in (self.attrs.get("metadata") or {}).items()}

    @property
    def token(self) -> str | None:
        """This version of the scan: a new random token each time it is written.

        Data derived from the scan (proposals) records it, so that a write of derived data
        can refuse a scan rewritten meanwhile and verify() can tell stale parts.
        """
        from .bank import scan_token_of

        return scan_token_of(self.attrs)

    @property
    def array_names(self) -> list[str]:
        """Arrays of the scan itself (not of its parts)."""
        return sorted(self.info.get("arrays", {}))

    @cached_property
    def proposals_attrs(self) -> dict[str, Any] | None:
        """Attributes of the proposals part, or None when the scan has none."""
        if not self.has(PROPOSALS_PART):
            return None
        return dict(self._group[PROPOSALS_PART].attrs)

    def proposal_set_attrs(self, name: str = "default") -> dict[str, Any] | None:
        """Attributes of proposal set ``name``, or None when the scan lacks it."""
        if name == "default":
            return self.proposals_attrs
        part = proposals_part(name)
        return dict(self._group[part].attrs) if self.has(part) else None

    @cached_property
    def proposal_sets(self) -> list[str]:
        """Names of the proposal sets the scan holds (read from its group, not the index)."""
        names = (set_of_part(key) for key, _ in self._group.groups())
        return sorted(n for n in names if n is not None)

    def has(self, name: str) -> bool:
        """True if an array or part (e.g. 'label', 'proposals', 'proposals/labels') exists."""
        try:
            check_array_name(name)
        except ValueError:
            return False
        try:
            self._group[name]
        except KeyError:
            return False
        return True

    def array(self, name: str) -> zarr.Array:
        """The lazy zarr.Array; nothing is decoded until it is indexed."""
        if name not in self._arrays:
            check_array_name(name)
            try:
                node = self._group[name]
            except KeyError:
                raise KeyError(
                    f"scan {self.scan_id!r} has no array {name!r} (it has {self.array_names}"
                    + (f" and part {PROPOSALS_PART!r}" if self.has(PROPOSALS_PART) else "")
                    + ")"
                ) from None
            if not isinstance(node, zarr.Array):
                raise KeyError(f"{name!r} in scan {self.scan_id!r} is a group, not an array")
            self._arrays[name] = node
        return self._arrays[name]

    def read(self, name: str, roi: Roi = None) -> np.ndarray:
        """Decode `roi` (a tuple of slices, numpy semantics) of an array; only touched chunks."""
        arr = self.array(name)
        if roi is None:
            return arr[...]
        if isinstance(roi, list):
            roi = tuple(roi)
        elif not isinstance(roi, tuple):
            roi = (roi,)
        return arr[roi]

    # ------------------------------------------------------------- notebook API
    def lazy(self, name: str) -> LazyArray:
        """A stored array as a ``LazyArray`` (numpy on slicing, ``.to_dask()`` on request)."""
        from .lazy_array import LazyArray

        return LazyArray(self, name)

    @property
    def image(self) -> LazyArray:
        """The normalised image, lazily: ``scan.image[:, :, 40]`` decodes one slice's chunks."""
        return self.lazy("image")

    @property
    def body(self) -> LazyArray:
        """The body mask, lazily."""
        return self.lazy("body")

    @property
    def label(self) -> LazyArray | None:
        """The evaluation label map, lazily; None when the scan has none."""
        return self.lazy("label") if self.has("label") else None

    def proposal_masks(self, ids, roi: Roi = None, name: str = "default") -> np.ndarray:
        """Boolean masks of proposals ``ids`` of set ``name`` inside ``roi``, (K, *roi shape)."""
        from .proposal_store import ProposalReader

        return ProposalReader(self, name).masks(ids, roi)

    def proposal_table(self, name: str = "default") -> Any:
        """``bank.proposal_table(scan_id, name)`` of a scan already opened (no mask read): a
        pandas DataFrame, one row a proposal of set ``name``; ``NoProposalsError`` when
        the scan lacks the set."""
        from .proposal_store import ProposalReader
        from .tables import proposal_table

        return proposal_table(ProposalReader(self, name), tuple(self.spacing))

    def proposal_mask(self, i: int, name: str = "default") -> np.ndarray:
        """The whole-scan boolean mask of proposal ``i`` of set ``name``."""
        return self.proposal_masks([i], name=name)[0]

    def overlay(
        self, what: Any, roi: Roi = None, proposal_set: str = "default", dtype: Any = None
    ) -> np.ndarray | None:
        """``what`` as one label map inside ``roi``, for overlays and exports (None -> None).

        An array name (``"label"``, ``"body"``) is read as stored; proposal ids (one or a
        list) of set ``proposal_set`` become labels 1..K in their order, a later id winning
        an overlap (``dtype`` as in ``masks_to_labels``). The viewer, the static figure and
        the NIfTI export all draw through here, so each reaches every proposal set.
        """
        if what is None:
            return None
        if isinstance(what, str):
            if not self.has(what) and what in self.proposal_sets:
                raise ValueError(
                    f"{what!r} is a proposal set of scan {self.scan_id!r}, not an array: pass "
                    f"proposal ids with proposal_set={what!r} (a table of them: "
                    f"bank.proposal_table({self.scan_id!r}, {what!r}))"
                )
            return self.read(what, roi)
        from .proposal_store import masks_to_labels

        ids = [what] if isinstance(what, (int, np.integer)) else list(what)
        return masks_to_labels(self.proposal_masks(ids, roi, proposal_set), dtype)

    def to_nifti(
        self,
        path,
        roi: Roi = None,
        proposals=None,
        array: str = "image",
        proposal_set: str = "default",
    ) -> dict:
        """Write the scan (inside ``roi``) as NIfTI with the bank's affine, for Slicer/ITK-SNAP.

        ``proposals`` (ids of set ``proposal_set``, or an array name like ``"label"``) also
        writes a label map beside it (``<stem>_masks.nii.gz``). Returns the written paths
        by role.
        """
        from .nifti_export import to_nifti

        return to_nifti(
            self, path, roi=roi, proposals=proposals, array=array, proposal_set=proposal_set
        )

    def show(self, proposals=None, viewer: str = "auto", proposal_set: str = "default"):
        """NiiVue in the notebook when ``ipyniivue`` is installed, else a static figure;
        ``proposals`` are ids of set ``proposal_set`` (or an array name)."""
        from .viewer import show

        return show(self, proposals=proposals, viewer=viewer, proposal_set=proposal_set)

    def _repr_html_(self) -> str:
        from .browse import scan_html

        return scan_html(self)


def open_view(owner: Bank | ScanOpener, scan_id: str, store, path: str, missing: str) -> ScanView:
    """The view of the scan group at ``path``; a missing group raises BankError with
    ``missing`` (what happened, what to do) after the scan and location."""
    try:
        group = zarr.open_group(store, path=path, mode="r")
    except (FileNotFoundError, KeyError) as exc:
        raise BankError(f"scan {scan_id!r} of {owner.location}: {missing} ({exc})") from None
    return ScanView(owner, scan_id, group)


def _reopen_scan(bank: Bank | ScanOpener, scan_id: str) -> ScanView:
    return bank.scan(scan_id)
