"""Map a result on the prepared (network) grid back onto the scan's original grid.

The prepared grid is the original one reoriented (permutation and flips), resampled
along each axis and cropped to the body, so ``inv(prepared affine) @ original affine``
is a signed, scaled permutation plus an offset: every original voxel's centre lands at a
prepared coordinate computed per axis. The result is read at the nearest prepared voxel
(nearest neighbour: labels stay labels), and voxels outside the crop are background.
Computed from the two affines alone, so it is exact whatever path made the grid: at the
original spacing every original voxel lands on a prepared voxel centre and the round
trip is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_AXIS_TOL = 1e-6


@dataclass(frozen=True)
class GridMap:
    """Per original axis: the prepared axis it lands on and each voxel's prepared index.

    ``index[r]`` holds, for prepared axis ``r``, the prepared index of every voxel of the
    original axis ``source[r]`` (``-1`` where it falls outside the prepared crop).
    """

    original_shape: tuple[int, int, int]
    prepared_shape: tuple[int, int, int]
    source: tuple[int, int, int]
    index: tuple[np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def between(
        cls,
        original_shape: tuple[int, ...],
        original_affine: np.ndarray,
        prepared_shape: tuple[int, ...],
        prepared_affine: np.ndarray,
    ) -> GridMap:
        """The map from the two grids' shapes and voxel->world affines."""
        to_prepared = np.linalg.inv(np.asarray(prepared_affine, float)) @ np.asarray(
            original_affine, float
        )
        m, t = to_prepared[:3, :3], to_prepared[:3, 3]
        source, index = [], []
        for r in range(3):
            row = np.abs(m[r])
            a = int(np.argmax(row))
            if np.any(np.delete(row, a) > _AXIS_TOL * row[a]):
                raise ValueError(
                    "the prepared grid is not a reoriented, resampled crop of the original "
                    f"(axis {r} mixes original axes: {m[r].round(6).tolist()})"
                )
            coord = m[r, a] * np.arange(original_shape[a], dtype=np.float64) + t[r]
            idx = np.floor(coord + 0.5 + 1e-9).astype(np.int64)
            idx[(idx < 0) | (idx >= prepared_shape[r])] = -1
            source.append(a)
            index.append(idx)
        if sorted(source) != [0, 1, 2]:
            raise ValueError(f"prepared axes do not map one-to-one onto original axes ({source})")
        return cls(
            tuple(int(s) for s in original_shape),  # type: ignore[arg-type]
            tuple(int(s) for s in prepared_shape),  # type: ignore[arg-type]
            tuple(source),  # type: ignore[arg-type]
            tuple(index),  # type: ignore[arg-type]
        )

    def to_original(self, prepared: np.ndarray, fill: float = 0, dtype=None) -> np.ndarray:
        """``prepared`` (the prepared grid) read at every original voxel, in the original order.

        Voxels outside the prepared crop get ``fill``. Memory: one array of the original
        grid (a padded copy of the prepared block besides).
        """
        if tuple(prepared.shape) != self.prepared_shape:
            raise ValueError(
                f"expected the prepared grid {self.prepared_shape}, got {prepared.shape}"
            )
        dtype = np.dtype(dtype or prepared.dtype)
        padded = np.full(tuple(n + 1 for n in prepared.shape), fill, dtype=dtype)
        padded[: prepared.shape[0], : prepared.shape[1], : prepared.shape[2]] = prepared
        out = padded[np.ix_(*self.index)]  # -1 reads the padding
        # axis r of ``out`` runs along original axis source[r]: put them back in order
        return np.ascontiguousarray(out.transpose(np.argsort(self.source)))
