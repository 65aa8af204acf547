"""Small sharded Blosc arrays for the shard-reader and chunk-cache tests (bank and train)."""

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle


def sharded(root, name, data, chunks, shards, fill=0, write=None):
    arr = root.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=[BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)],
        fill_value=fill,
    )
    if write is None:
        arr[...] = data
    else:
        arr[write] = data[write]
    return arr


def all_chunks(arr):
    return list(np.ndindex(*(-(-n // c) for n, c in zip(arr.shape, arr.chunks, strict=True))))
