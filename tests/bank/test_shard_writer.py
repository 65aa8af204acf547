"""Direct shard writing: zarr and the shard reader decode it, byte for byte as zarr's own shards."""

import numpy as np
import pytest
import zarr

import maskbank.bank.shard_writer as shard_writer
from maskbank.bank.chunk_reader import ShardedBloscReader
from maskbank.bank.encoding import Encoding, write_array
from maskbank.bank.shard_writer import write_shards
from tests.bank.sharded_arrays import all_chunks


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("shape", "dtype", "chunk", "max_shard"),
    [
        ((37, 20, 45), np.float16, 16, 32),  # edge chunks and edge shards (45 > 32)
        ((16, 16, 16), np.bool_, 8, 16),  # exactly one full shard
        ((50, 9, 30), np.uint16, 8, 64),  # one shard larger than the array: empty slots
        ((70, 5, 3), np.int16, 64, 64),  # chunk edges clipped to the array
    ],
)
def test_direct_shards_read_back_through_zarr_and_the_reader(
    tmp_path, shape, dtype, chunk, max_shard
):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=shape) * 50).round().astype(dtype)
    if dtype == np.bool_:
        data = rng.random(shape) > 0.7
    encoding = Encoding(chunk=chunk, max_shard=max_shard)
    group = zarr.open_group(tmp_path / "direct", mode="w-", zarr_format=3)
    record = write_array(group, "a", data, encoding, shape)
    arr = zarr.open_array(tmp_path / "direct", path="a", mode="r")
    np.testing.assert_array_equal(arr[...], data)  # zarr is the reference decoder
    reader = ShardedBloscReader.of(arr)
    for g, got in reader.read_chunks(all_chunks(arr)).items():
        sl = tuple(slice(x * c, (x + 1) * c) for x, c in zip(g, arr.chunks, strict=True))
        np.testing.assert_array_equal(got, data[sl])
    assert record["shards"] == list(encoding.volume_layout(shape)[1])


def test_direct_shards_hold_the_same_chunks_as_zarrs(tmp_path, monkeypatch):
    """Same compressed chunks and index entries as zarr's own writer (chunk order aside)."""
    data = np.random.default_rng(1).integers(0, 9, size=(40, 24, 33)).astype(np.uint16)
    encoding = Encoding(chunk=8, max_shard=16)
    direct = zarr.open_group(tmp_path / "direct", mode="w-", zarr_format=3)
    write_array(direct, "a", data, encoding, data.shape)
    monkeypatch.setattr(shard_writer, "_layout", lambda arr: None)  # force zarr's writer
    plain = zarr.open_group(tmp_path / "zarr", mode="w-", zarr_format=3)
    write_array(plain, "a", data, encoding, data.shape)
    ours, theirs = _files(tmp_path / "direct"), _files(tmp_path / "zarr")
    assert ours.keys() == theirs.keys()
    a = zarr.open_array(tmp_path / "direct", path="a", mode="r")
    b = zarr.open_array(tmp_path / "zarr", path="a", mode="r")
    ra, rb = ShardedBloscReader.of(a), ShardedBloscReader.of(b)
    shards = sorted(k for k in ours if len(k.parts) > 2 and k.parts[1] == "c")
    assert shards
    for key in shards:
        coords = tuple(int(x) for x in key.parts[2:])
        ra._load_indexes([coords])
        rb._load_indexes([coords])
        ia, ib = ra._index[coords], rb._index[coords]
        assert np.array_equal(ia[..., 1], ib[..., 1])  # every chunk's compressed length
        for local in np.ndindex(*ia.shape[:-1]):
            (oa, na), (ob, nb) = ia[local], ib[local]
            assert (
                ours[key][int(oa) : int(oa) + int(na)] == theirs[key][int(ob) : int(ob) + int(nb)]
            )


def test_layouts_it_does_not_know_are_left_to_zarr(tmp_path):
    group = zarr.open_group(tmp_path / "g", mode="w-", zarr_format=3)
    plain = group.create_array("p", shape=(8, 8, 8), dtype="u1", chunks=(4, 4, 4))
    assert write_shards(plain, np.ones((8, 8, 8), np.uint8)) is False
    memory = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    arr = memory.create_array("m", shape=(8, 8, 8), dtype="u1", chunks=(4, 4, 4), shards=(8, 8, 8))
    assert write_shards(arr, np.ones((8, 8, 8), np.uint8)) is False
