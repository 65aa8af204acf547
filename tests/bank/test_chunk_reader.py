"""Direct shard decoding: same chunks as zarr, missing shards read as fill, bad index refused."""

import numpy as np
import pytest
import zarr

from maskbank.bank.chunk_reader import ShardedBloscReader
from tests.bank.sharded_arrays import all_chunks, sharded


def test_corrupt_shard_index_is_an_error(tmp_path):
    root = zarr.open_group(tmp_path / "g.zarr", mode="w")
    data = np.ones((16, 16, 16), np.uint8)
    arr = sharded(root, "a", data, (8, 8, 8), (16, 16, 16))
    shard = tmp_path / "g.zarr" / "a" / "c" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the index, before its checksum
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        ShardedBloscReader.of(arr).read_chunks([(0, 0, 0)])


def test_non_local_stores_take_the_async_path():
    """A store that is not a LocalStore (here in memory) is read through zarr's async API."""
    store = zarr.storage.MemoryStore()
    root = zarr.open_group(store, mode="w")
    data = np.random.default_rng(1).integers(0, 300, size=(40, 33, 20)).astype(np.uint16)
    arr = sharded(root, "a", data, (8, 8, 8), (16, 16, 16), fill=3, write=np.s_[:30, :, :])
    reader = ShardedBloscReader.of(arr)
    assert reader is not None and reader._root is None
    expect = arr[...]
    for g, chunk in reader.read_chunks(all_chunks(arr)).items():
        sl = tuple(slice(x * c, (x + 1) * c) for x, c in zip(g, arr.chunks, strict=True))
        np.testing.assert_array_equal(chunk, expect[sl])
    assert (expect[32:] == 3).all()  # a never-written shard row reads as fill_value


@pytest.mark.parametrize(
    ("data", "chunks", "compressors"),
    [
        (np.arange(3704 * 3, dtype=np.float32).reshape(3704, 3), None, "blosc"),
        (np.arange(50, dtype=np.int64) * -7, None, "blosc"),
        (np.array([True, False, True]), None, None),  # bytes codec only
        (np.zeros(0, np.int32), None, "blosc"),  # zero rows: no chunk file, fill value
    ],
)
def test_read_whole_local_equals_zarr(tmp_path, data, chunks, compressors):
    from maskbank.bank.chunk_reader import read_whole_local

    codec = zarr.codecs.BloscCodec(cname="zstd", clevel=5) if compressors else None
    arr = zarr.create_array(
        tmp_path / "a",
        shape=data.shape,
        dtype=data.dtype,
        chunks=data.shape if data.size else (1,),
        compressors=codec,
    )
    arr[...] = data
    got = read_whole_local(tmp_path, "a")
    assert got is not None and got.dtype == data.dtype
    np.testing.assert_array_equal(got, data)
    np.testing.assert_array_equal(got, arr[...])


def test_read_whole_local_declines_other_layouts(tmp_path):
    """Several chunks, sharding or another codec: None, and the caller reads through zarr."""
    from maskbank.bank.chunk_reader import read_whole_local

    zarr.create_array(tmp_path / "multi", shape=(100,), dtype="int32", chunks=(10,))[...] = 1
    zarr.create_array(
        tmp_path / "zstd", shape=(10,), dtype="int32", compressors=zarr.codecs.ZstdCodec()
    )[...] = 1
    sharded(zarr.open_group(tmp_path), "sh", np.zeros((8, 8, 8), np.uint16), (4, 4, 4), (8, 8, 8))
    for name in ("multi", "zstd", "sh", "missing"):
        assert read_whole_local(tmp_path, name) is None, name


def test_of_local_reads_like_of(tmp_path):
    """The reader built from zarr.json alone decodes what the one from the zarr array does."""
    root = zarr.open_group(tmp_path / "g.zarr", mode="w")
    data = np.random.default_rng(3).integers(0, 900, size=(40, 33, 20)).astype(np.uint16)
    arr = sharded(root, "sub/a", data, (8, 8, 8), (16, 16, 16), fill=5, write=np.s_[:30])
    local = ShardedBloscReader.of_local(tmp_path / "g.zarr", "sub/a")
    via_zarr = ShardedBloscReader.of(arr)
    assert local is not None and local.store is None
    assert (local.shape, local.chunk, local.shard, local.dtype, local.fill) == (
        via_zarr.shape,
        via_zarr.chunk,
        via_zarr.shard,
        via_zarr.dtype,
        via_zarr.fill,
    )
    want = via_zarr.read_chunks(all_chunks(arr))
    got = local.read_chunks(all_chunks(arr))
    assert got.keys() == want.keys()
    for g in want:
        np.testing.assert_array_equal(got[g], want[g])
    root.create_array("plain", shape=(8, 8, 8), dtype="uint16", chunks=(4, 4, 4))
    for name in ("plain", "missing", "sub"):  # another layout, no array, a group
        assert ShardedBloscReader.of_local(tmp_path / "g.zarr", name) is None, name
