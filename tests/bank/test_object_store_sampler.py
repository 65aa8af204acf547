"""The trainer's sampler streams from a bank on S3, reading only the chunks a crop touches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import WrapperStore

from maskbank.bank import Bank, ScanView
from maskbank.bank.sampling import ChunkCache
from maskbank.flows.demo_bank import build_phantom_bank
from tests.bank.conftest import SMALL, make_arrays, make_attrs
from tests.s3_server import S3

torch = pytest.importorskip("torch")


class CountingStore(WrapperStore):
    """The bank's real store, counting the bytes each read returns."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.nbytes = 0  # of chunk (shard) reads
        self.keys: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        got = await self._store.get(key, prototype, byte_range)
        self.keys.append(key)
        if not key.endswith("zarr.json"):
            self.nbytes += 0 if got is None else len(got)
        return got


def test_pair_stream_from_s3_equals_the_local_stream(s3: S3, tmp_path: Path, monkeypatch) -> None:
    from maskbank.train.pair_sampler import PairStream, make_loader
    from maskbank.train.run_config import DataConfig

    monkeypatch.setenv("MASKBANK_STORAGE_OPTIONS", s3.options_json)  # as workers inherit it
    shape = (64, 56, 48)
    build_phantom_bank(s3.url(), n_scans=2, shape=shape)
    build_phantom_bank(tmp_path / "bank", n_scans=2, shape=shape)
    cfg = DataConfig(crop=24, margin=4, k=5, min_mask_voxels=8, batch_size=2)
    remote = PairStream(s3.url(), cfg, seed=3, max_batches=2)
    local = PairStream(str(tmp_path / "bank"), cfg, seed=3, max_batches=2)
    assert remote.fingerprint == local.fingerprint
    for b in range(2):
        got, want = remote.batch(b), local.batch(b)
        assert sorted(got) == sorted(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    batches = list(make_loader(remote, num_workers=1, prefetch_factor=1))  # a worker process
    assert len(batches) == 2
    assert torch.equal(batches[1]["ref_image"], local.batch(1)["ref_image"])


def test_a_crop_reads_only_its_chunks_byte_ranges(s3: S3) -> None:
    bank = Bank.create(s3.url(), encoding=SMALL, storage_options=s3.options)
    arrays = make_arrays(1, (64, 64, 48))
    bank.write_scan("a", arrays, make_attrs("a"))
    counting = CountingStore(bank.store)
    group = zarr.open_group(counting, path=bank.scan_path("a"), mode="r")
    view = ScanView(bank, "a", group)
    fs = s3.filesystem()
    shard = fs.size(f"{s3.bucket}/bank/{bank.scan_path('a')}/image/c/0/0/0")
    roi = (slice(2, 14), slice(3, 15), slice(1, 9))  # inside one 16^3 chunk of a 32^3 shard
    counting.nbytes, counting.keys = 0, []
    got = ChunkCache(0).read(view, "image", roi)
    np.testing.assert_array_equal(got, arrays["image"][roi])
    index = 8 * 16 + 4  # 2x2x2 chunks per shard, 16 bytes each + CRC32C
    shard_key = f"{bank.scan_path('a')}/image/c/0/0/0"
    # the array's metadata, then the shard index and the one chunk's byte range
    assert counting.keys == [f"{bank.scan_path('a')}/image/zarr.json", shard_key, shard_key]
    assert index < counting.nbytes < shard / 4
