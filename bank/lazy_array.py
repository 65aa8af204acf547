"""A scan's array that decodes only what is sliced: ``scan.image[:, :, 40]``.

Notebook users index volumes as numpy arrays; reading a whole CT to look at one slice
would decode every chunk. ``LazyArray`` answers ``shape``/``dtype`` from metadata,
decodes only the chunks a slice touches, and turns into a ``dask.array`` with the
bank's chunks on request (for out-of-core statistics over many scans).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .scan import ScanView


class LazyArray:
    """One array of one scan; numpy on slicing, dask on request."""

    def __init__(self, scan: ScanView, name: str) -> None:
        self._scan = scan
        self.name = name
        self._array = scan.array(name)  # metadata only: nothing is decoded

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        """The bank's chunk shape (the unit that is decoded)."""
        return tuple(self._array.chunks)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._array[key])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.asarray(self._array[...])
        return out if dtype is None else out.astype(dtype, copy=False)

    def to_dask(self) -> Any:
        """A ``dask.array`` over this array, one dask chunk per bank chunk."""
        import dask.array as da

        return da.from_array(self._array, chunks=self.chunks, name=False)

    def __repr__(self) -> str:
        return (
            f"LazyArray({self._scan.scan_id!r}/{self.name}, shape={self.shape}, "
            f"dtype={self.dtype}, chunks={self.chunks})"
        )
