"""Starting the pair stream on a large bank: the rows are read in place, with the cyclic
collector held, and each DataLoader worker freezes the bank it opens
(bench/sampler_scale.py measures it at 100,000 scans)."""

from __future__ import annotations

import gc
import hashlib
import json
import pickle
from dataclasses import replace

import pytest
import torch

from maskbank.bank import Bank
from maskbank.train import pair_sampler
from maskbank.train.pair_sampler import PairStream, make_loader
from maskbank.train.run_config import DataConfig
from maskbank.train.scan_choice import bank_fingerprint, eligible_rows, gc_paused, scan_weights

CFG = DataConfig(crop=32, margin=8, k=13, min_mask_voxels=16, batch_size=2)


def _fingerprint_as_before(bank, proposals: str = "default") -> str:
    """The fingerprint as it was computed from ``bank.index`` (resumed runs compare it)."""
    rows = [
        [r["scan_id"], r.get("source_sha256"), r.get("shape"), r.get("n_proposals")]
        for r in bank.index
    ]
    if proposals != "default":
        from maskbank.train.scan_choice import set_count

        rows.append([proposals, [set_count(r, proposals) for r in bank.index]])
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def test_fingerprint_and_rows_are_those_of_the_index(phantom_bank):
    bank = Bank.open(phantom_bank)
    for name in ("default", "other"):
        assert bank_fingerprint(bank, name) == _fingerprint_as_before(bank, name)
    rows = eligible_rows(bank, CFG)
    assert [dict(r) for r in rows] == bank.index  # same rows, same order (no copies made)
    assert rows[0] is bank.index_rows[rows[0]["scan_id"]]
    ids = [r["scan_id"] for r in rows]
    some = eligible_rows(bank, replace(CFG, scans=tuple(ids[1:])))
    assert [r["scan_id"] for r in some] == ids[1:]


def test_weights_without_tables_are_uniform_and_with_them_as_before(phantom_bank):
    rows = eligible_rows(Bank.open(phantom_bank), CFG)
    assert scan_weights(rows, CFG).tolist() == [1 / len(rows)] * len(rows)
    cfg = replace(CFG, modality_weights={"ct": 3.0})
    w = scan_weights(rows, cfg)
    raw = [3.0 if r["modality"] == "ct" else 1.0 for r in rows]
    assert w.tolist() == pytest.approx([x / sum(raw) for x in raw])


def test_an_open_bank_is_read_as_it_is(phantom_bank, monkeypatch):
    by_path = PairStream(phantom_bank, CFG, seed=1)
    expected = by_path.batch(0)
    bank = Bank.open(phantom_bank)

    def no_second_open(location):
        raise AssertionError(f"bank {location} opened again")

    monkeypatch.setattr(pair_sampler, "open_bank", no_second_open)
    given = PairStream(bank, CFG, seed=1)
    assert given.location == by_path.location and given.scan_ids == by_path.scan_ids
    assert given.fingerprint == by_path.fingerprint and (given.probs == by_path.probs).all()
    assert given._bank is bank  # it serves this process: a batch opens nothing
    assert torch.equal(given.batch(0)["ref_image"], expected["ref_image"])
    spawned = pickle.loads(pickle.dumps(given))  # a spawned worker opens its own
    assert spawned._bank is None and not spawned._scans


def test_start_up_leaves_the_collector_as_it_found_it(phantom_bank):
    frozen = gc.get_freeze_count()
    assert gc.isenabled()
    stream = PairStream(phantom_bank, CFG, seed=0)
    assert gc.isenabled()
    with gc_paused():
        PairStream(phantom_bank, CFG, seed=0)
        assert not gc.isenabled()
    assert gc.isenabled()
    stream.batch(0)  # opens the bank in this process: no worker, nothing frozen
    assert gc.isenabled() and gc.get_freeze_count() == frozen


class _FreezeReport(PairStream):
    """The stream's batches plus how many objects the worker had frozen when it built them."""

    def batch(self, local_batch: int) -> dict[str, torch.Tensor]:
        out = super().batch(local_batch)
        out["frozen"] = torch.tensor(gc.get_freeze_count())
        out["gc_on"] = torch.tensor(gc.isenabled())
        return out


def test_a_worker_freezes_its_bank_and_keeps_collecting(phantom_bank):
    stream = _FreezeReport(phantom_bank, CFG, seed=0, max_batches=2)
    loader = make_loader(stream, num_workers=1, prefetch_factor=1)
    batches = list(loader)
    assert len(batches) == 2 and all(b["gc_on"] for b in batches)
    assert all(b["frozen"] > gc.get_freeze_count() for b in batches)
    # the same pairs as drawn in this process: freezing changes nothing drawn
    again = PairStream(phantom_bank, CFG, seed=0).batch(1)
    assert torch.equal(batches[1]["ref_image"], again["ref_image"])
    assert torch.equal(batches[1]["proposal_ids"], again["proposal_ids"])


def test_workers_open_scans_without_the_index(phantom_bank, tmp_path):
    import shutil

    copy = tmp_path / "bank"
    shutil.copytree(phantom_bank, copy)
    stream = PairStream(copy, CFG, seed=0, max_batches=2)
    expected = PairStream(copy, CFG, seed=0).batch(1)
    (copy / "index.json").write_text("{ not json")  # a worker that parsed it would fail
    with pytest.raises(Exception, match="index"):
        Bank.open(copy)
    batches = list(make_loader(stream, num_workers=1, prefetch_factor=1))
    assert len(batches) == 2
    assert torch.equal(batches[1]["ref_image"], expected["ref_image"])
    assert torch.equal(batches[1]["query_bits"], expected["query_bits"])
