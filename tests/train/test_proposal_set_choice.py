"""data.proposals: the pair stream draws from the named proposal set, and only scans that have it."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.bank.sampling import ProposalReader
from maskbank.bank.writing import write_proposals
from maskbank.pipeline.proposals.external import from_masks
from maskbank.pipeline.proposals.features import compute_features
from maskbank.train.checkpointing import load_checkpoint
from maskbank.train.pair_sampler import PairStream, SamplerError
from maskbank.train.run import main
from maskbank.train.run_config import ConfigError, DataConfig

CFG = DataConfig(crop=32, margin=8, k=13, min_mask_voxels=16, batch_size=2, proposals="mirror")


@pytest.fixture(scope="module")
def mirrored(phantom_bank, tmp_path_factory) -> tuple[str, str]:
    """A copy of the phantom bank whose second scan also has set 'mirror': its default
    proposals flipped along x (masks no default proposal has)."""
    path = tmp_path_factory.mktemp("sets") / "bank"
    shutil.copytree(phantom_bank, path)
    bank = Bank.open(path, mode="a")
    scan_id = bank.scan_ids[1]
    reader = ProposalReader(bank.scan(scan_id))
    masks = [np.flip(reader.mask(i), 0) for i in range(reader.count)]
    write_proposals(
        bank, scan_id, compute_features(from_masks(masks, "mirror"), None, None), name="mirror"
    )
    return str(path), scan_id


def test_stream_reads_the_named_set(mirrored):
    path, scan_id = mirrored
    stream = PairStream(path, CFG, seed=3)
    assert stream.scan_ids == [scan_id]
    assert stream.fingerprint != PairStream(path, replace(CFG, proposals="default")).fingerprint
    reader = ProposalReader(Bank.open(path).scan(scan_id), "mirror")
    size = CFG.read_size
    batch = stream.batch(0)
    for j in range(CFG.batch_size):
        full = reader.masks(batch["proposal_ids"][j].numpy())
        start = batch["ref_start"][j].numpy()
        bits = batch["ref_bits"][j, 0].numpy()
        lo = np.maximum(start, 0)
        hi = np.minimum(start + size, full.shape[1:])
        inner = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        for k in range(CFG.k):
            np.testing.assert_array_equal((bits[inner] >> k) & 1, full[k][box].astype(np.int32))


def test_missing_set_names_the_sets_there(mirrored):
    path, _ = mirrored
    cfg = replace(CFG, proposals="totalseg")
    with pytest.raises(SamplerError, match=r"'totalseg'.*default, mirror"):
        PairStream(path, cfg)


def _train(bank: str, out, *keys: str, resume: bool = False) -> int:
    flags = ["--config", "tiny", "--bank", bank, "--out", str(out), *(["--resume"] * resume)]
    return main([*flags, "train.progress=false", "train.tensorboard=false", "max_steps=2", *keys])


def test_trainer_trains_on_the_named_set_and_resumes_only_on_it(mirrored, tmp_path, capsys):
    path, _ = mirrored
    out = tmp_path / "run"
    assert _train(path, out, "data.proposals=mirror") == 0, capsys.readouterr().err
    assert "; 1 scans;" in capsys.readouterr().err  # only the scan that has 'mirror'
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert state["config"]["data"]["proposals"] == "mirror"
    assert state["sampler"]["config"]["proposals"] == "mirror"
    assert state["bank_fingerprint"] == PairStream(path, CFG).fingerprint
    # Resuming on the default set would continue another stream: refused, naming the set.
    assert _train(path, out, "max_steps=3", resume=True) == 2
    assert "data.proposals=mirror" in capsys.readouterr().err


def test_trainer_refuses_an_unknown_set_before_writing_anything(mirrored, tmp_path, capsys):
    path, _ = mirrored
    out = tmp_path / "run"
    assert _train(path, out, "data.proposals=totalseg") == 2
    err = capsys.readouterr().err
    assert "'totalseg'" in err and "(sets there: default, mirror)" in err
    assert not out.exists()


def test_data_config_takes_the_set_name():
    assert DataConfig.from_dict({"proposals": "slic"}).proposals == "slic"
    assert DataConfig().proposals == "default"
    with pytest.raises(ConfigError, match="data.proposals"):
        DataConfig(proposals="Bad-Name").validate()
