"""The chunk cache (bank.ChunkCache) on top of direct shard decoding, and bit/count pieces."""

import numpy as np
import pytest
import zarr

from maskbank.bank import Bank
from maskbank.bank.chunk_reader import ShardedBloscReader
from maskbank.bank.sampling import ChunkCache, ProposalReader
from tests.bank.sharded_arrays import all_chunks, sharded


class _View:
    """The two things ChunkCache needs from a ScanView, over a bare zarr group."""

    def __init__(self, group, scan_id="s"):
        self.group, self.scan_id = group, scan_id

    def array(self, name):
        return self.group[name]

    def read(self, name, roi):
        return self.group[name][roi]


def test_bank_arrays_take_the_direct_path_and_decode_like_zarr(phantom_bank):
    bank = Bank.open(phantom_bank)
    scan = bank.scan(bank.index[0]["scan_id"])
    names = ["image"] + ["proposals/layers/" + n for n in ProposalReader(scan).layer_names]
    for name in names:
        arr = scan.array(name)
        reader = ShardedBloscReader.of(arr)
        assert reader is not None, name
        full = arr[...]
        got = reader.read_chunks(all_chunks(arr))
        for g, chunk in got.items():
            sl = tuple(slice(x * c, (x + 1) * c) for x, c in zip(g, arr.chunks, strict=True))
            np.testing.assert_array_equal(chunk, full[sl])


def test_edge_chunks_missing_chunks_and_missing_shards(tmp_path):
    root = zarr.open_group(tmp_path / "g.zarr", mode="w")
    rng = np.random.default_rng(0)
    data = rng.integers(1, 500, size=(50, 37, 29)).astype(np.uint16)
    # Only part of the array written: unwritten chunks (and a whole unwritten shard) read as 7.
    arr = sharded(root, "a", data, (8, 8, 8), (16, 16, 16), fill=7, write=np.s_[:20, :30, :])
    expect = arr[...]
    assert (expect == 7).any() and (expect != 7).any()
    reader = ShardedBloscReader.of(arr)
    assert reader is not None
    got = reader.read_chunks(all_chunks(arr))
    for g, chunk in got.items():
        sl = tuple(slice(x * c, (x + 1) * c) for x, c in zip(g, arr.chunks, strict=True))
        assert chunk.shape == expect[sl].shape
        np.testing.assert_array_equal(chunk, expect[sl])
    cache = ChunkCache(1 << 20)
    view = _View(root)
    for roi in (np.s_[3:49, 0:37, 5:29], np.s_[18:22, 29:31, 0:1], np.s_[40:50, 30:37, 20:29]):
        np.testing.assert_array_equal(cache.read(view, "a", roi), expect[roi])


def test_other_layouts_fall_back_to_zarr(tmp_path):
    root = zarr.open_group(tmp_path / "g.zarr", mode="w")
    data = np.arange(20 * 20 * 20, dtype=np.float32).reshape(20, 20, 20)
    plain = root.create_array("plain", shape=data.shape, dtype=data.dtype, chunks=(8, 8, 8))
    plain[...] = data
    assert ShardedBloscReader.of(plain) is None
    cache = ChunkCache(1 << 20)
    roi = np.s_[3:19, 0:20, 7:9]
    np.testing.assert_array_equal(cache.read(_View(root), "plain", roi), data[roi])
    assert cache.misses > 0


def test_bits_from_pieces_match_reader_masks_in_both_dtypes(phantom_bank):
    from maskbank.train.crop_masks import LAYERS_PATH, ProposalIndex

    bank = Bank.open(phantom_bank)
    scan = bank.scan(bank.index[1]["scan_id"])
    reader = ProposalReader(scan)
    index = ProposalIndex(reader)
    roi = (slice(5, 70), slice(10, 80), slice(0, 50))
    cache = ChunkCache(1 << 24)
    # include the proposals of binary layers (labels 0/1: the multiply path)
    binary = np.flatnonzero(np.array(index.layer_sizes)[index.layer] <= 2)[:4]
    assert len(binary)
    rest = np.setdiff1d(np.arange(index.count), binary)
    pick = np.random.default_rng(0).choice(rest, size=14 - len(binary), replace=False)
    ids = np.sort(np.concatenate([binary, pick]))
    layers = {
        int(j): cache.pieces(scan, LAYERS_PATH + index.layer_names[j], roi)
        for j in np.unique(index.layer[ids])
    }
    shape = tuple(s.stop - s.start for s in roi)
    origin = [s.start for s in roi]
    want = reader.masks(ids, roi)
    assert want.any()
    for dtype in (np.uint16, np.int32):
        bits = index.bits(layers, ids, shape, 1 << 14, origin, dtype)
        assert bits.dtype == dtype
        for k in range(len(ids)):
            np.testing.assert_array_equal((bits >> k) & 1, want[k])
        assert np.all((bits >> 14) & 1)
    with pytest.raises(ValueError, match="do not fit"):
        index.bits(layers, ids, shape, 1 << 16, origin, np.uint16)


def test_histogram_fast_paths_equal_bincount():
    from maskbank.train.crop_masks import _histogram

    rng = np.random.default_rng(3)
    for high, n in ((2, 3), (2, 2), (1, 3), (400, 401), (3, 4)):
        block = rng.integers(0, high, size=(20, 21, 22)).astype(np.uint16)[2:18, 1:, ::2]
        got = _histogram(block, n)
        want = np.bincount(block.ravel(), minlength=n)
        np.testing.assert_array_equal(got[: len(want)], want)
        assert not got[len(want) :].any()


def test_counts_in_pieces_equal_counts_and_reader(phantom_bank):
    from maskbank.train.crop_masks import LAYERS_PATH, ProposalIndex

    bank = Bank.open(phantom_bank)
    scan = bank.scan(bank.index[0]["scan_id"])
    reader = ProposalReader(scan)
    index = ProposalIndex(reader)
    cache = ChunkCache(1 << 24)
    roi = (slice(3, 77), slice(20, 80), slice(7, 64))
    layers = range(len(index.layer_names))
    names = {j: LAYERS_PATH + index.layer_names[j] for j in layers}
    got = index.counts_in_pieces({j: cache.pieces(scan, names[j], roi) for j in layers})
    blocks = {j: scan.read(names[j], roi) for j in layers}
    np.testing.assert_array_equal(got, index.counts(blocks, (slice(None),) * 3))
    np.testing.assert_array_equal(got, reader.voxels_in_box(roi))
    assert got.any() and not got.all()


def test_readers_are_bounded_and_reads_stay_exact(tmp_path):
    """A worker on a bank of thousands of scans keeps at most MAX_READERS shard readers."""
    root = zarr.open_group(tmp_path / "g.zarr", mode="w")
    data = np.arange(24 * 20 * 16, dtype=np.uint16).reshape(24, 20, 16)
    for name in ("a", "b", "c"):
        sharded(root, name, data, (8, 8, 8), (16, 16, 16))
    cache = ChunkCache(0)
    cache.MAX_READERS = 2
    roi = np.s_[3:21, 0:20, 5:16]
    for name in ("a", "b", "c", "a"):
        np.testing.assert_array_equal(cache.read(_View(root), name, roi), data[roi])
        assert len(cache._readers) <= 2
    assert list(cache._readers) == [("s", "c"), ("s", "a")]


def test_local_banks_are_read_without_opening_arrays_in_zarr(phantom_bank, tmp_path):
    """On local disk the cache builds readers from zarr.json; an fsspec store opens the array."""
    import uuid
    from pathlib import Path

    import fsspec

    bank = Bank.open(phantom_bank)
    sid = bank.index[0]["scan_id"]
    roi = (slice(5, 70), slice(10, 80), slice(0, 50))
    want = bank.scan(sid).read("image", roi)
    cache = ChunkCache(1 << 24)
    np.testing.assert_array_equal(cache.read(bank.scan(sid), "image", roi), want)
    _, reader, arr = cache._readers[(sid, "image")]
    assert reader is not None and arr is None
    fs, where = fsspec.filesystem("memory"), f"/bank-{uuid.uuid4().hex}"
    fs.put(str(Path(bank.location)) + "/", where, recursive=True)
    try:
        remote = Bank.open(f"memory://{where}").scan(sid)
        cache = ChunkCache(1 << 24)
        np.testing.assert_array_equal(cache.read(remote, "image", roi), want)
        _, reader, arr = cache._readers[(sid, "image")]
        assert reader is not None and arr is not None
    finally:
        fs.rm(where, recursive=True)
