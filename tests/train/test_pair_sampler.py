from dataclasses import replace

import numpy as np
import pytest
import torch

from maskbank.bank import Bank
from maskbank.bank.sampling import ProposalReader
from maskbank.train.pair_sampler import (
    MAX_SCANS_PER_PAIR,
    PairStream,
    SamplerError,
    make_loader,
)
from maskbank.train.run_config import DataConfig

CFG = DataConfig(crop=32, margin=8, k=13, min_mask_voxels=16, batch_size=2)


def _cut(volume: np.ndarray, start: np.ndarray, size: int, fill) -> np.ndarray:
    """Reference implementation: a padded box of a full in-memory volume."""
    out = np.full((*volume.shape[:-3], size, size, size), fill, dtype=volume.dtype)
    src, dst = [], []
    for s, n in zip(start.tolist(), volume.shape[-3:], strict=True):
        lo, hi = max(s, 0), min(s + size, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(..., *dst)] = volume[(..., *src)]
    return out


def test_crops_and_masks_match_full_volumes(phantom_bank):
    stream = PairStream(phantom_bank, CFG, seed=1)
    bank = Bank.open(phantom_bank)
    size = CFG.read_size
    for b in range(3):
        batch = stream.batch(b)
        for j in range(CFG.batch_size):
            scan = bank.scan(stream.scan_ids[int(batch["scan_index"][j])])
            image = scan.read("image")
            reader = ProposalReader(scan)
            ids = batch["proposal_ids"][j].numpy()
            full_masks = reader.masks(ids)  # (K, *shape), whole volume
            for side in ("ref", "query"):
                start = batch[f"{side}_start"][j].numpy()
                got_img = batch[f"{side}_image"][j, 0].numpy()
                inside = _cut(np.ones(image.shape, bool), start, size, False)
                want_img = _cut(image.astype(np.float32), start, size, np.nan)
                np.testing.assert_array_equal(got_img[inside], want_img[inside])
                if not inside.all():  # padding: one value, the minimum of the union box read
                    pad = np.unique(got_img[~inside])
                    assert len(pad) == 1 and pad[0] <= got_img[inside].min()
                bits = batch[f"{side}_bits"][j, 0].numpy()
                for k in range(CFG.k):
                    want = _cut(full_masks[k], start, size, False)
                    np.testing.assert_array_equal((bits >> k) & 1, want.astype(np.int32))
                assert np.all((bits >> CFG.k) & 1)  # the global all-ones task
                assert not np.any(bits >> (CFG.k + 1))
            # every chosen proposal is visible in the reference crop (inside the margin)
            ref_inner = batch["ref_start"][j].numpy() + CFG.margin
            for k in range(CFG.k):
                assert _cut(full_masks[k], ref_inner, CFG.crop, False).sum() >= CFG.min_mask_voxels
            shift = (batch["ref_start"][j] - batch["query_start"][j]).abs().numpy()
            assert np.all(shift <= CFG.crop * (1 - CFG.min_overlap))


def test_worker_and_rank_sharding_cover_without_duplicates(phantom_bank):
    seen = []
    batches_per_rank = 4
    for rank in range(2):
        stream = PairStream(
            phantom_bank, CFG, seed=0, rank=rank, world_size=2, max_batches=batches_per_rank
        )
        loader = make_loader(stream, num_workers=2, prefetch_factor=1)
        for local, batch in enumerate(loader):
            # batches arrive in stream order whatever the worker count
            assert batch["sample_id"].tolist() == list(stream.sample_ids_of_batch(local))
            seen += batch["sample_id"].tolist()
    total = 2 * batches_per_rank * CFG.batch_size
    assert sorted(seen) == list(range(total))


def test_stream_is_reproducible_and_resumable(phantom_bank):
    a = PairStream(phantom_bank, CFG, seed=4, max_batches=3)
    first = list(a)
    resumed = list(PairStream(phantom_bank, CFG, seed=4, start_batch=2, max_batches=1))
    for key in ("ref_image", "query_bits", "proposal_ids", "ref_start"):
        assert torch.equal(first[2][key], resumed[0][key])
    other = next(iter(PairStream(phantom_bank, CFG, seed=5, max_batches=1)))
    assert not torch.equal(first[0]["ref_image"], other["ref_image"])
    # An open Bank works as well as its path (workers re-open it from its location).
    opened = list(PairStream(Bank.open(phantom_bank), CFG, seed=4, max_batches=3))
    assert torch.equal(opened[2]["query_bits"], first[2]["query_bits"])


def test_weights_select_scans(phantom_bank):
    cfg = replace(CFG, modality_weights={"ct": 1.0, "mr": 0.0, "pet": 0.0})
    stream = PairStream(phantom_bank, cfg, seed=0)
    ct = [i for i, s in enumerate(stream.scan_ids) if "-ct-" in s]
    picked = {int(stream.sample(i)["scan_index"]) for i in range(6)}
    assert picked == set(ct)


def test_clear_errors(tmp_path, sparse_bank):
    with pytest.raises(SamplerError, match="cannot open bank"):
        PairStream(str(tmp_path / "missing"), CFG)
    with pytest.raises(SamplerError, match=r"fewer than k=13 proposals: phantom-ct-000 \(9\)"):
        PairStream(sparse_bank, CFG)


def test_fsspec_url_gives_the_same_stream(phantom_bank):
    local = PairStream(phantom_bank, CFG, seed=2).batch(0)
    remote = PairStream(f"file://{phantom_bank}", CFG, seed=2).batch(0)
    for key in ("ref_image", "query_bits", "proposal_ids"):
        assert torch.equal(local[key], remote[key])


def test_chunk_cache_reads_equal_plain_reads_and_stay_bounded(phantom_bank):
    from maskbank.train.crop_masks import ChunkCache

    bank = Bank.open(phantom_bank)
    scan = bank.scan(bank.index[0]["scan_id"])
    name = "proposals/layers/" + ProposalReader(scan).layer_names[0]
    chunk = scan.array(name).chunks
    cache = ChunkCache(max_bytes=4 * int(np.prod(chunk)) * scan.array(name).dtype.itemsize)
    rng = np.random.default_rng(0)
    for _ in range(12):
        lo = rng.integers(0, np.array(scan.shape) - 1)
        hi = np.minimum(lo + rng.integers(1, 70, size=3), scan.shape)
        roi = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        for arr in (name, "image"):
            np.testing.assert_array_equal(cache.read(scan, arr, roi), scan.read(arr, roi))
        assert cache.nbytes <= cache.max_bytes or len(cache._chunks) == 1
    assert cache.hits > 0 and cache.misses > 0
    off = ChunkCache(0)
    np.testing.assert_array_equal(off.read(scan, "image", roi), scan.read("image", roi))
    assert off.hits == 0 and off.misses > 0 and off.nbytes == 0 and not off._chunks


def test_cache_does_not_change_the_stream(phantom_bank):
    cached = PairStream(phantom_bank, CFG, seed=3)
    plain = PairStream(phantom_bank, CFG, seed=3, chunk_cache_mb=0)
    for b in range(2):
        x, y = cached.batch(b), plain.batch(b)
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert cached.chunks.hits > 0 and plain.chunks.hits == 0


def test_compiled_label_loops_do_not_change_the_stream(phantom_bank, monkeypatch):
    """Counts and bit fields through train.kernels.labels equal the numpy route."""
    from types import SimpleNamespace

    from maskbank.train import crop_masks

    fast = [PairStream(phantom_bank, CFG, seed=4).batch(b) for b in range(2)]
    reference = SimpleNamespace(
        label_histogram=lambda labels, n: np.bincount(labels.ravel(), minlength=n),
        or_lookup=lambda src, lut, dst: np.bitwise_or(dst, lut[src], out=dst),
    )
    monkeypatch.setattr(crop_masks, "label_loops", reference)
    plain = [PairStream(phantom_bank, CFG, seed=4).batch(b) for b in range(2)]
    for x, y in zip(fast, plain, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_pairs_per_scan_visit_is_deterministic_and_shares_scans(phantom_bank):
    cfg = replace(CFG, pairs_per_scan_visit=4)
    stream = PairStream(phantom_bank, cfg, seed=6, max_batches=4)
    batches = list(stream)
    scans = torch.cat([b["scan_index"] for b in batches]).tolist()
    # pairs 4v .. 4v+3 share one scan (no fallback needed on this bank), visits differ
    assert all(len(set(scans[v : v + 4])) == 1 for v in range(0, len(scans), 4))
    anchors = torch.cat([b["ref_start"] for b in batches])
    assert len({tuple(a) for a in anchors.tolist()[:4]}) > 1  # different crops per visit
    resumed = next(iter(PairStream(phantom_bank, cfg, seed=6, start_batch=3, max_batches=1)))
    assert all(torch.equal(batches[3][k], resumed[k]) for k in resumed)
    # P = 1 is the default stream, pair for pair
    one = replace(CFG, pairs_per_scan_visit=1)
    a, b = (
        PairStream(phantom_bank, one, seed=6).batch(0),
        PairStream(phantom_bank, CFG, seed=6).batch(0),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pickled_stream_carries_no_decoded_chunks(phantom_bank):
    import pickle

    stream = PairStream(phantom_bank, CFG, seed=0)
    first = stream.sample(0)
    assert stream.chunks.nbytes > 0
    clone = pickle.loads(pickle.dumps(stream))
    assert clone.chunks.nbytes == 0 and clone.chunks.max_bytes == stream.chunks.max_bytes
    again = clone.sample(0)
    assert all(np.array_equal(first[k], again[k]) for k in ("ref_image", "query_bits"))


def test_batch_slots_equal_standalone_samples(phantom_bank):
    """batch() fills each pair's crops in place; the result equals sample() pair by pair."""
    stream = PairStream(phantom_bank, CFG, seed=5)
    batch = stream.batch(1)
    for j, i in enumerate(stream.sample_ids_of_batch(1)):
        alone = stream.sample(i)
        for key in ("ref_image", "query_image", "ref_bits", "query_bits"):
            assert batch[key].dtype == (torch.float32 if "image" in key else torch.int32)
            np.testing.assert_array_equal(batch[key][j, 0].numpy(), alone[key])
        np.testing.assert_array_equal(batch["proposal_ids"][j].numpy(), alone["proposal_ids"])


def test_compact_stream_holds_the_same_values(phantom_bank):
    """compact=True: float16 images (the bank's type), int16 bit fields; same values, same
    pairs, in sample() and in batch() (slots), and the wide stream is unchanged."""
    wide = PairStream(phantom_bank, CFG, seed=5)
    compact = PairStream(phantom_bank, CFG, seed=5, compact=True)
    image_dtype = wide._open(wide.scan_ids[0])[0].array("image").dtype
    batch_w, batch_c = wide.batch(1), compact.batch(1)
    for j, i in enumerate(compact.sample_ids_of_batch(1)):
        a, b = wide.sample(i), compact.sample(i)
        assert b["ref_image"].dtype == (np.float16 if image_dtype == np.float16 else np.float32)
        assert b["ref_bits"].dtype == np.int16
        for key in ("ref_image", "query_image"):
            np.testing.assert_array_equal(b[key].astype(np.float32), a[key])
            np.testing.assert_array_equal(batch_c[key][j, 0].numpy(), b[key])
            np.testing.assert_array_equal(batch_w[key][j, 0].numpy(), a[key])
        for key in ("ref_bits", "query_bits"):
            np.testing.assert_array_equal(b[key].view(np.uint16).astype(np.int32), a[key])
            np.testing.assert_array_equal(batch_c[key][j, 0].numpy(), b[key])
        np.testing.assert_array_equal(a["proposal_ids"], b["proposal_ids"])
    assert batch_c["ref_bits"].dtype == torch.int16
    # The batches' image type is the stream's, fixed when it opened the bank.
    assert wide.image_dtype == np.float32 and batch_w["ref_image"].dtype == torch.float32
    assert compact.image_dtype == (np.float16 if image_dtype == np.float16 else np.float32)
    assert batch_c["ref_image"].numpy().dtype == compact.image_dtype


def test_compact_padding_fills_bit_15(phantom_bank):
    """The all-ones task at bit 15 (K = 15) is written into uint16 padding as 0x8000."""
    stream = PairStream(phantom_bank, CFG, seed=5, compact=True)
    size = CFG.read_size
    dst = (slice(2, size), slice(0, size - 3), slice(1, size - 1))
    out = stream._padded(dst, 1 << 15, np.uint16)
    assert out.dtype == np.uint16
    outside = np.ones(out.shape, bool)
    outside[dst] = False
    assert (out[outside] == 1 << 15).all()


def test_a_pair_no_scan_can_serve_is_an_error_not_an_endless_search(phantom_bank):
    """Proposals this large exist nowhere: each of MAX_SCANS_PER_PAIR scans is tried at
    max_anchor_tries anchors, then the sampler says what to change."""
    impossible = replace(CFG, min_mask_voxels=10**9, max_anchor_tries=2)
    stream = PairStream(phantom_bank, impossible, seed=1)
    with pytest.raises(SamplerError, match=r"no crop of 32\^3 with k=13 proposals"):
        stream.sample(0)
    assert MAX_SCANS_PER_PAIR >= 1


ABSENT = replace(CFG, disjoint_frac=0.3, absent_frac=0.3)


def _query_presence(batch, j: int, cfg: DataConfig) -> np.ndarray:
    """(K,) whether each task has a voxel in the query's inner crop (margin stripped)."""
    m = cfg.margin
    bits = batch["query_bits"][j, 0].numpy()[m:-m, m:-m, m:-m]
    return np.array([bool(((bits >> k) & 1).any()) for k in range(cfg.k)])


def test_absent_tasks_and_disjoint_queries_are_drawn_deterministically(phantom_bank):
    stream = PairStream(phantom_bank, ABSENT, seed=3)
    absent, disjoint, pairs = 0, 0, 0
    for b in range(6):
        batch = stream.batch(b)
        for j in range(ABSENT.batch_size):
            pairs += 1
            absent += int((~_query_presence(batch, j, ABSENT)).sum())
            shift = (batch["ref_start"][j] - batch["query_start"][j]).abs().numpy()
            disjoint += bool(np.any(shift >= ABSENT.crop))
    # Without absence the sampler (nearly) always shows every task in the query; with it
    # a real share of tasks has an empty target and some queries lie beside the reference.
    share = absent / (pairs * ABSENT.k)
    assert 0.15 < share < 0.9, share
    assert disjoint >= 1
    plain = PairStream(phantom_bank, CFG, seed=3)
    base = sum(
        int((~_query_presence(plain.batch(b), j, CFG)).sum()) for b in range(6) for j in range(2)
    )
    assert base / (pairs * CFG.k) < share / 2
    again = PairStream(phantom_bank, ABSENT, seed=3).batch(4)
    first = stream.batch(4)
    for key in ("query_bits", "ref_bits", "proposal_ids", "query_start"):
        assert torch.equal(first[key], again[key])


def test_absent_choice_keeps_every_task_visible_in_the_reference(phantom_bank):
    stream = PairStream(phantom_bank, ABSENT, seed=8)
    m = ABSENT.margin
    for b in range(3):
        batch = stream.batch(b)
        bits = batch["ref_bits"][:, 0].numpy()[:, m:-m, m:-m, m:-m]
        for j in range(ABSENT.batch_size):
            for k in range(ABSENT.k):
                assert ((bits[j] >> k) & 1).sum() >= ABSENT.min_mask_voxels


def test_max_ref_fill_prefers_proposals_that_leave_a_boundary(phantom_bank):
    def fill_share(cfg: DataConfig) -> float:
        stream = PairStream(phantom_bank, cfg, seed=2)
        m, shares = cfg.margin, []
        for b in range(6):
            bits = stream.batch(b)["ref_bits"][:, 0].numpy()[:, m:-m, m:-m, m:-m]
            for k in range(cfg.k):
                shares.append(((bits >> k) & 1).reshape(len(bits), -1).mean(-1) > 0.5)
        return float(np.mean(shares))

    few = replace(CFG, k=5)  # K the crops can serve without filling masks
    natural = fill_share(few)
    preferred = fill_share(replace(few, max_ref_fill=0.5))
    assert natural > 0.05  # the phantoms' large organs and body fill some reference crops
    assert preferred < natural / 3, (natural, preferred)
    # With K = 13 filling masks make up the numbers where too few others are in view.
    assert fill_share(replace(CFG, max_ref_fill=0.5)) < fill_share(CFG)
