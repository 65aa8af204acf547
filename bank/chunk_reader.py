"""Decode a bank volume's inner chunks straight from its shards (the trainer's fast read path).

The layout knowledge this needs (sharding codec, Blosc inner chunks, CRC32C
shard index) belongs to the bank, so it lives here; ``bank.chunk_cache``
builds the per-worker chunk cache on top of it.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np


def sharded_blosc(arr):
    """(sharding codec, Blosc codec) of a bank volume array in the layout read and written
    here -- inner chunks bytes (little-endian) + Blosc, index bytes (little-endian) +
    CRC32C, on a little-endian host -- else None (the caller goes through zarr)."""
    return _sharded_blosc_meta(arr.metadata, np.dtype(arr.dtype))


def _sharded_blosc_meta(metadata, dtype: np.dtype):
    """``sharded_blosc`` from an array's zarr v3 metadata and numpy dtype."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

    codecs = getattr(metadata, "codecs", None)
    if sys.byteorder != "little":
        return None
    if not codecs or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sh = codecs[0]
    inner, index = tuple(sh.codecs), tuple(sh.index_codecs)
    ok = (
        len(inner) == 2
        and isinstance(inner[0], BytesCodec)
        and isinstance(inner[1], BloscCodec)
        and (dtype.itemsize == 1 or inner[0].endian.value == "little")
        and len(index) == 2
        and isinstance(index[0], BytesCodec)
        and index[0].endian.value == "little"
        and isinstance(index[1], Crc32cCodec)
    )
    return (sh, inner[1]) if ok else None


@functools.lru_cache(maxsize=256)
def _is_bank_root(root: str) -> bool:
    """True if ``root`` is a bank's root folder (read once per process)."""
    try:
        doc = json.loads((Path(root) / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance((doc.get("attributes") or {}).get("maskbank"), dict)


def local_member(group, name: str) -> tuple[Path, str] | None:
    """(store root, path under it) of member ``name`` of a zarr ``group`` on a local store,
    else None: where the direct readers here may read files instead of going through zarr."""
    from zarr.storage import LocalStore

    from .store import unwrap

    store = unwrap(getattr(group, "store", None))
    if not isinstance(store, LocalStore):
        return None
    return Path(store.root), f"{group.path}/{name}" if group.path else name


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
    In a bank (``strict``: the array's store is the bank's, or ``root`` is a bank's root)
    a missing shard raises MissingChunkError: the bank writes every shard, so a missing
    one means the scan is being rewritten (zarr would return zeros). The check is the
    open that reads the bytes anyway, so it costs nothing. Elsewhere a missing shard
    reads as the fill value, as in zarr.
    """

    GAP = 1 << 20  # merge byte ranges closer than this into one request

    def __init__(
        self, store, path: str, metadata, sharding, root=None, strict: bool = False
    ) -> None:
        self.store = store
        self.path = path
        self.metadata = metadata
        self.shape = tuple(metadata.shape)
        self.dtype = np.dtype(metadata.data_type.to_native_dtype())
        self.fill = metadata.fill_value
        self.chunk = tuple(sharding.chunk_shape)
        self.shard = tuple(metadata.chunk_grid.chunk_shape)
        self.per_shard = tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))
        self.n_index = int(np.prod(self.per_shard)) * 16 + 4
        self.index_at_end = sharding.index_location.value == "end"
        self._index: dict[tuple[int, ...], np.ndarray | None] = {}
        self._fill_chunk: np.ndarray | None = None
        # A local store is read with plain file reads (no event-loop round trip per read).
        from zarr.storage import LocalStore

        from .store import unwrap

        if root is None and isinstance(unwrap(store), LocalStore):
            root = unwrap(store).root
        self._root = None if root is None else Path(root)
        self.strict = strict

    @classmethod
    def of(cls, arr) -> ShardedBloscReader | None:
        found = sharded_blosc(arr)
        if found is None:
            return None
        from .store import StrictStore

        store = arr.store_path.store
        strict = isinstance(store, StrictStore)
        return cls(store, arr.store_path.path, arr.metadata, found[0], strict=strict)

    @classmethod
    def of_local(cls, root, path: str) -> ShardedBloscReader | None:
        """The reader of the array at ``root / path`` on local disk, without opening it in zarr.

        Why: opening an array through zarr's synchronous API costs ~1.6 ms (an event-loop
        round trip and store reads); a sampler on a bank of thousands of scans opens an
        image and a few label layers for nearly every pair. Here ``zarr.json`` is read and
        parsed by zarr's own metadata class (~0.2 ms). None when it is not a zarr v3
        array in this layout (the caller then opens it through zarr).
        """
        from zarr.core.metadata.v3 import ArrayV3Metadata

        try:
            doc = json.loads((Path(root) / path / "zarr.json").read_bytes())
        except (OSError, ValueError):
            return None
        if doc.get("zarr_format") != 3 or doc.get("node_type") != "array":
            return None
        try:
            meta = ArrayV3Metadata.from_dict(doc)
            dtype = np.dtype(meta.data_type.to_native_dtype())
        except (ValueError, TypeError, KeyError):
            return None
        found = _sharded_blosc_meta(meta, dtype)
        if found is None:
            return None
        return cls(None, path, meta, found[0], root=root, strict=_is_bank_root(str(root)))

    def _key(self, shard: tuple[int, ...]) -> str:
        key = self.metadata.encode_chunk_key(shard)
        return f"{self.path}/{key}" if self.path else key

    async def _get(self, shard, byte_range):
        from zarr.core.buffer import default_buffer_prototype

        buf = await self.store.get(self._key(shard), default_buffer_prototype(), byte_range)
        return None if buf is None else buf.to_bytes()

    def _get_many(self, requests: list[tuple[tuple[int, ...], object]]) -> list[bytes | None]:
        """Bytes of each (shard, byte range) request; None for a missing shard outside a bank,
        MissingChunkError in one."""
        from zarr.abc.store import SuffixByteRequest

        from .store import missing_chunk

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
                    if self.strict:
                        raise missing_chunk(str(self._root), self._key(shard)) from None
                    got.append(None)
            return got
        from zarr.core.sync import sync

        async def fetch():
            import asyncio

            return await asyncio.gather(*(self._get(s, r) for s, r in requests))

        got = list(sync(fetch()))
        for (shard, _), raw in zip(requests, got, strict=True):
            if raw is None and self.strict:
                raise missing_chunk(str(getattr(self.store, "location", "")), self._key(shard))
        return got

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
            if raw is None:  # shard never written (outside a bank): every chunk is fill_value
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


_NUMPY_TYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
}  # fmt: skip


def read_whole_local(root, path: str) -> np.ndarray | None:
    """The whole array at ``root / path`` of a local store, decoded without zarr, or None.

    Why: a scan's proposal index is ~13 small one-chunk arrays; opening and reading each
    through zarr costs 1-3 ms of metadata parsing and event-loop hops (~25 ms per scan),
    which a sampler streaming from a bank of thousands of scans pays on almost every
    pair. This reads ``zarr.json`` and the single chunk file and decompresses it with
    numcodecs' Blosc. Only the layout the bank writes for them is handled -- zarr v3,
    one regular chunk, default chunk keys, ``bytes`` (little-endian) + optional ``blosc``,
    a plain numeric dtype; anything else (and a decoded size that does not match)
    returns None so the caller reads through zarr.
    """
    base = Path(root) / path
    try:
        meta = json.loads((base / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return None
    shape = meta.get("shape")
    codecs = meta.get("codecs") or []
    grid = meta.get("chunk_grid") or {}
    keys = meta.get("chunk_key_encoding") or {}
    dtype = meta.get("data_type")
    if (
        sys.byteorder != "little"
        or meta.get("zarr_format") != 3
        or meta.get("node_type") != "array"
        or meta.get("storage_transformers")
        or not isinstance(shape, list)
        or dtype not in _NUMPY_TYPES
        or grid.get("name") != "regular"
        or keys.get("name") != "default"
        or not 1 <= len(codecs) <= 2
        or codecs[0].get("name") != "bytes"
        or (codecs[0].get("configuration") or {}).get("endian", "little") != "little"
        or (len(codecs) == 2 and codecs[1].get("name") != "blosc")
    ):
        return None
    chunk = list((grid.get("configuration") or {}).get("chunk_shape") or [])
    if len(chunk) != len(shape) or any(c < s for c, s in zip(chunk, shape, strict=True)):
        return None  # more than one chunk
    dt = np.dtype(dtype)
    sep = (keys.get("configuration") or {}).get("separator", "/")
    key = sep.join(["c", *("0" for _ in shape)]) if shape else "c"
    try:
        raw = (base / key).read_bytes()
    except FileNotFoundError:
        if int(np.prod(shape)) and _is_bank_root(str(root)):
            from .store import missing_chunk  # the bank writes every chunk: not a fill block

            raise missing_chunk(str(root), f"{path}/{key}") from None
        fill = meta.get("fill_value", 0)  # never written: fill_value
        if not isinstance(fill, (bool, int, float)):
            return None  # "NaN"/"Infinity" and the like: let zarr parse them
        return np.full(shape, fill, dt)
    except OSError:
        return None
    if len(codecs) == 2:
        from numcodecs import blosc

        try:
            raw = blosc.decompress(raw)
        except RuntimeError:
            return None
    if len(raw) != int(np.prod(chunk)) * dt.itemsize:
        return None
    out = np.frombuffer(raw, dt).reshape(chunk)
    return out[tuple(slice(0, s) for s in shape)].copy()
