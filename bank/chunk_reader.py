"""Decode a bank volume's inner chunks straight from its shards (the trainer's fast read path).

The layout knowledge this needs (sharding codec, Blosc inner chunks, CRC32C
shard index) belongs to the bank, so it lives here; ``train.crop_masks``
builds its per-worker chunk cache on top of it.
"""

from __future__ import annotations

import sys

import numpy as np


def sharded_blosc(arr):
    """(sharding codec, Blosc codec) of a bank volume array in the layout read and written
    here -- inner chunks bytes (little-endian) + Blosc, index bytes (little-endian) +
    CRC32C, on a little-endian host -- else None (the caller goes through zarr)."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

    codecs = getattr(arr.metadata, "codecs", None)
    if sys.byteorder != "little" or arr.shards is None:
        return None
    if not codecs or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sh = codecs[0]
    inner, index = tuple(sh.codecs), tuple(sh.index_codecs)
    ok = (
        len(inner) == 2
        and isinstance(inner[0], BytesCodec)
        and isinstance(inner[1], BloscCodec)
        and (np.dtype(arr.dtype).itemsize == 1 or inner[0].endian.value == "little")
        and len(index) == 2
        and isinstance(index[0], BytesCodec)
        and index[0].endian.value == "little"
        and isinstance(index[1], Crc32cCodec)
    )
    return (sh, inner[1]) if ok else None


class ShardedBloscReader:
    """Decode inner chunks of one sharded, Blosc-compressed zarr v3 array straight from the store.

    Why: the bank stores volumes as shards of 64^3 Blosc chunks (``bank.encoding``).
    zarr's own partial shard read fetches every inner chunk with its own store
    request and decodes it in a thread hop; on the sampler's reads that overhead
    is ~0.6 ms per chunk, several times the decompression itself (~0.1 ms for a
    label chunk). Here each shard index is fetched once per process (banks are
    written atomically and never modified in place), the needed chunks' byte
    ranges are coalesced into few store requests issued together, and chunks are
    decompressed with numcodecs' Blosc directly. ``of()`` returns None for any
    other layout (the caller then reads through zarr); the index checksum is verified.
    """

    GAP = 1 << 20  # merge byte ranges closer than this into one request

    def __init__(self, arr, sharding) -> None:
        self.store = arr.store_path.store
        self.path = arr.store_path.path
        self.metadata = arr.metadata
        self.shape = tuple(arr.shape)
        self.dtype = np.dtype(arr.dtype)
        self.fill = arr.fill_value
        self.chunk = tuple(sharding.chunk_shape)
        self.shard = tuple(arr.shards)
        self.per_shard = tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))
        self.n_index = int(np.prod(self.per_shard)) * 16 + 4
        self.index_at_end = sharding.index_location.value == "end"
        self._index: dict[tuple[int, ...], np.ndarray | None] = {}
        self._fill_chunk: np.ndarray | None = None
        # A local store is read with plain file reads (no event-loop round trip per read).
        from zarr.storage import LocalStore

        self._root = self.store.root if isinstance(self.store, LocalStore) else None

    @classmethod
    def of(cls, arr) -> ShardedBloscReader | None:
        found = sharded_blosc(arr)
        return None if found is None else cls(arr, found[0])

    def _key(self, shard: tuple[int, ...]) -> str:
        key = self.metadata.encode_chunk_key(shard)
        return f"{self.path}/{key}" if self.path else key

    async def _get(self, shard, byte_range):
        from zarr.core.buffer import default_buffer_prototype

        buf = await self.store.get(self._key(shard), default_buffer_prototype(), byte_range)
        return None if buf is None else buf.to_bytes()

    def _get_many(self, requests: list[tuple[tuple[int, ...], object]]) -> list[bytes | None]:
        """Bytes of each (shard, byte range) request (None where the shard does not exist)."""
        from zarr.abc.store import SuffixByteRequest

        if self._root is not None:
            got = []
            for shard, req in requests:
                try:
                    with open(self._root / self._key(shard), "rb") as fh:
                        if isinstance(req, SuffixByteRequest):
                            fh.seek(-req.suffix, 2)
                            got.append(fh.read())
                        else:
                            fh.seek(req.start)
                            got.append(fh.read(req.end - req.start))
                except FileNotFoundError:
                    got.append(None)
            return got
        from zarr.core.sync import sync

        async def fetch():
            import asyncio

            return await asyncio.gather(*(self._get(s, r) for s, r in requests))

        return list(sync(fetch()))

    def _load_indexes(self, shards: list[tuple[int, ...]]) -> None:
        import google_crc32c
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest

        need = [s for s in shards if s not in self._index]
        if not need:
            return
        req = (
            SuffixByteRequest(self.n_index)
            if self.index_at_end
            else RangeByteRequest(0, self.n_index)
        )
        for shard, raw in zip(need, self._get_many([(s, req) for s in need]), strict=True):
            if raw is None:  # shard never written: every chunk is fill_value
                self._index[shard] = None
                continue
            body, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
            if google_crc32c.value(body) != crc:
                raise ValueError(f"{self._key(shard)}: shard index checksum mismatch")
            self._index[shard] = np.frombuffer(body, "<u8").reshape(*self.per_shard, 2)

    def read_chunks(self, coords: list[tuple[int, ...]]) -> dict[tuple[int, ...], np.ndarray]:
        """Chunk grid coords -> decoded chunk (clipped to the array's bounds; not to be modified)."""
        from numcodecs import blosc
        from zarr.abc.store import RangeByteRequest

        where = {
            g: (
                tuple(x // p for x, p in zip(g, self.per_shard, strict=True)),
                tuple(x % p for x, p in zip(g, self.per_shard, strict=True)),
            )
            for g in coords
        }
        self._load_indexes(sorted({s for s, _ in where.values()}))
        spans: dict[tuple[int, ...], list[tuple[int, int, tuple[int, ...]]]] = {}
        out: dict[tuple[int, ...], np.ndarray] = {}
        for g, (shard, local) in where.items():
            index = self._index[shard]
            off, nb = (
                (None, None) if index is None else (int(index[local][0]), int(index[local][1]))
            )
            if index is None or off == 2**64 - 1:  # never written: fill_value (one shared chunk)
                if self._fill_chunk is None:
                    self._fill_chunk = np.full(self.chunk, self.fill, self.dtype)
                out[g] = self._clip(g, self._fill_chunk)
            else:
                spans.setdefault(shard, []).append((off, off + nb, g))
        requests = []  # (shard, start, stop, [(start, stop, g), ...])
        for shard, items in spans.items():
            items.sort()
            run = [items[0]]
            for it in items[1:]:
                if it[0] - run[-1][1] <= self.GAP:
                    run.append(it)
                else:
                    requests.append((shard, run[0][0], max(r[1] for r in run), run))
                    run = [it]
            requests.append((shard, run[0][0], max(r[1] for r in run), run))

        raws = self._get_many([(s, RangeByteRequest(a, b)) for s, a, b, _ in requests])
        # One decoding thread, as zarr's own reads (which decode off the main thread) and
        # as a DataLoader worker per core expects: numcodecs would use blosc's thread pool
        # when called from the main thread.
        threads, blosc.use_threads = blosc.use_threads, False
        try:
            for (_, a, _, run), raw in zip(requests, raws, strict=True):
                mv = memoryview(raw)
                for lo, hi, g in run:
                    chunk = np.empty(self.chunk, self.dtype)
                    blosc.decompress(mv[lo - a : hi - a], chunk)
                    out[g] = self._clip(g, chunk)
        finally:
            blosc.use_threads = threads
        return out

    def _clip(self, g: tuple[int, ...], chunk: np.ndarray) -> np.ndarray:
        valid = tuple(min(c, n - x * c) for x, c, n in zip(g, self.chunk, self.shape, strict=True))
        if valid == self.chunk:
            return chunk
        return np.ascontiguousarray(chunk[tuple(slice(0, v) for v in valid)])  # exact nbytes
