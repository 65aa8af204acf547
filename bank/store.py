"""The bank's read store: a missing chunk or shard file is an error, not a block of zeros.

Zarr decodes an absent chunk key as the array's fill value. The bank writes every
chunk of every array (`write_empty_chunks`, `bank.shard_writer`), so a chunk key
that is absent inside an array's extent means the scan is being rewritten under
the reader or a file was lost: a trainer must not silently train on zeros.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from .errors import MissingChunkError

_METADATA = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")


def is_chunk_key(key: str) -> bool:
    """True for chunk/shard keys of the default v3 encoding (``.../c/0/1/2``)."""
    if key.rsplit("/", 1)[-1] in _METADATA:
        return False
    return key == "c" or key.startswith("c/") or "/c/" in key or key.endswith("/c")


def missing_chunk(location: str, key: str) -> MissingChunkError:
    return MissingChunkError(
        f"{location}: chunk file {key} is missing (zarr would read it as zeros). The scan is "
        "being rewritten (reopen it once its writer is done) or was damaged (run "
        "`maskbank verify`, then prepare the scan again)"
    )


class StrictStore(WrapperStore):
    """Wraps the bank's store; raises MissingChunkError where zarr expects a chunk."""

    def __init__(self, store: Store, location: str = "") -> None:
        super().__init__(store)
        self.location = location

    def _with_store(self, store: Store) -> StrictStore:
        return type(self)(store, self.location)

    @property
    def inner(self) -> Store:
        """The wrapped store (e.g. a LocalStore that the direct readers read files of)."""
        return self._store

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        got = await self._store.get(key, prototype, byte_range)
        if got is None and is_chunk_key(key):
            raise missing_chunk(self.location, key)
        return got

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        got = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, got, strict=True):
            if value is None and is_chunk_key(key):
                raise missing_chunk(self.location, key)
        return got

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, StrictStore) and self._store == other._store

    def __hash__(self) -> int:
        return hash(("strict", id(self._store)))


def unwrap(store: Any) -> Any:
    """The store under a StrictStore (anything else unchanged)."""
    return store.inner if isinstance(store, StrictStore) else store
