"""How arrays are chunked, sharded and compressed on disk.

Volumes (3-D arrays on the scan grid) are cut into cubic inner chunks sized for
the trainer's random 128^3 crops and packed into shards so that a scan is a
handful of files, not thousands. Tables (1-D/2-D, e.g. CSR proposal members)
get plain chunking. The figures behind the defaults are in docs/bank-format.md.
"""

from __future__ import annotations

import difflib
import math
import zlib
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from .layout import set_of_part
from .shard_writer import write_shards

TABLE_CHUNK_BYTES = 4 << 20  # ~4 MiB of a 1-D/2-D table per chunk
_CRC_SLAB_BYTES = 64 << 20
# Chunks encoded per batch when Zarr writes (tables, and volumes in layouts that
# `bank.shard_writer` does not handle). Zarr's default (1) schedules every chunk as its
# own asyncio task; batches of 64 wrote a chest CT's image + body in 79 ms, not 127.
_WRITE_BATCH = 64


@dataclass(frozen=True)
class Encoding:
    """Bank-wide array encoding, stored in the root attributes so every writer agrees."""

    chunk: int = 64  # inner chunk edge (voxels) of volume arrays
    max_shard: int = 512  # shard edge cap (voxels); shards cover the whole scan up to this
    cname: str = "zstd"
    clevel: int = 2  # 5-7x faster to write than level 5 for 3-15 % more bytes (bench/RESULTS.md)
    # The proposals part follows ~15 s of proposal generation, so its 0.3 s of level-5
    # compression is free, and label layers shrink by a quarter (238 -> 175 B/proposal).
    proposals_clevel: int = 5
    shuffle: str = "shuffle"  # byte shuffle beat bitshuffle on float16 CT (bench/RESULTS.md)

    def to_dict(self) -> dict:
        return asdict(self)

    # Keys older banks recorded in their encoding attributes and this version no longer has:
    # tolerated (and dropped) when a bank is opened. None so far; any other unknown key is
    # refused, naming the closest valid one.
    LEGACY_KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, data: dict) -> Encoding:
        names = list(cls.__dataclass_fields__)
        for key in data:
            if key not in names and key not in cls.LEGACY_KEYS:
                match = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
                hint = f" (did you mean '{match[0]}'?)" if match else f"; valid keys: {names}"
                raise ValueError(f"unknown encoding key '{key}'{hint}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.max_shard < self.chunk or self.max_shard % self.chunk:
            raise ValueError(
                f"need 1 <= chunk <= max_shard and max_shard % chunk == 0, got {self.chunk}, "
                f"{self.max_shard}"
            )

    def for_part(self, part: str | None) -> Encoding:
        """The encoding one part of a scan is written with (see ``proposals_clevel``)."""
        if set_of_part(part) is not None and self.proposals_clevel != self.clevel:
            return replace(self, clevel=self.proposals_clevel)
        return self

    def compressor(self, dtype: np.dtype) -> BloscCodec:
        return BloscCodec(
            cname=self.cname,
            clevel=self.clevel,
            shuffle=BloscShuffle(self.shuffle),
            typesize=max(1, np.dtype(dtype).itemsize),
        )

    def volume_layout(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(inner chunk shape, shard shape) for a volume of this shape."""
        chunks = tuple(max(1, min(self.chunk, n)) for n in shape)
        shards = tuple(
            min(self.max_shard, c * math.ceil(max(n, 1) / c))
            for n, c in zip(shape, chunks, strict=True)
        )
        return chunks, shards

    def table_chunks(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
        """Chunks of a table: whole rows, about TABLE_CHUNK_BYTES each."""
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize)
        rows = max(1, min(max(shape[0], 1), TABLE_CHUNK_BYTES // row_bytes))
        return (rows, *(max(1, n) for n in shape[1:]))


def is_volume(array: np.ndarray, grid: tuple[int, ...] | None) -> bool:
    """Volumes are 3-D arrays on the scan grid (or any 3-D array when the grid is unknown)."""
    return array.ndim == 3 and (grid is None or tuple(array.shape) == tuple(grid))


def write_array(
    group: zarr.Group,
    name: str,
    data: np.ndarray,
    encoding: Encoding,
    grid: tuple[int, ...] | None,
) -> dict:
    """Create and fill one array; return the per-array record kept in the scan attributes."""
    data = np.ascontiguousarray(data)
    if data.dtype.hasobject or data.dtype.kind not in "biuf":
        raise TypeError(f"array {name!r}: dtype {data.dtype} is not storable (use bool/int/float)")
    if is_volume(data, grid):
        chunks, shards = encoding.volume_layout(data.shape)
    else:
        chunks, shards = encoding.table_chunks(data.shape, data.dtype), None
    with zarr.config.set({"codec_pipeline.batch_size": _WRITE_BATCH}):
        arr = _create(group, name, data, chunks, shards, encoding)
        if data.size and (shards is None or not write_shards(arr, data)):
            arr[...] = data
    return {
        "shape": list(data.shape),
        "dtype": data.dtype.str,
        "chunks": list(chunks),
        "shards": list(shards) if shards else None,
        "crc32": crc32_of(data),
    }


def _create(group: zarr.Group, name: str, data: np.ndarray, chunks, shards, encoding: Encoding):
    return group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=[encoding.compressor(data.dtype)],
        fill_value=False if data.dtype == np.bool_ else 0,
        overwrite=True,
        # Store every chunk: skips a compare-to-fill pass over the data, and a scan's
        # chunks are almost never all fill (shards keep empty ones to a few bytes).
        config={"write_empty_chunks": True},
    )


def crc32_of(data: np.ndarray) -> int:
    """CRC-32 of the C-order bytes; lets verify notice lost shards that decode as fill value."""
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B"))


def iter_slabs(arr: zarr.Array):
    """Yield (start, C-order slab) along axis 0, shard-aligned, about 64 MiB each."""
    if arr.size == 0:
        return
    row = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    step = max(1, _CRC_SLAB_BYTES // row)
    if arr.shards is not None:
        step = max(arr.shards[0], (step // arr.shards[0]) * arr.shards[0])
    for start in range(0, arr.shape[0], step):
        yield start, np.ascontiguousarray(arr[start : start + step])


def crc32_of_array(arr: zarr.Array) -> int:
    """CRC-32 of a stored array, decoded slab by slab to bound memory (equals crc32_of)."""
    crc = zlib.crc32(b"")
    for _, slab in iter_slabs(arr):
        crc = zlib.crc32(memoryview(slab).cast("B"), crc)
    return crc
