"""Pretexts: the reconstruction baseline runs, checkpoints and resumes like in-context runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskbank.train.checkpointing import load_checkpoint
from maskbank.train.incontext_net import build_model
from maskbank.train.pretext import PRETEXTS, PretextError, ReconstructionNet, create_pretext
from maskbank.train.pretext.reconstruction import block_mask
from maskbank.train.run import main
from maskbank.train.run_config import load_config

STEPS = 16
QUICK = ["train.progress=false", "train.tensorboard=true", "train.image_every=4"]
RECON = ["pretext=reconstruction", f"max_steps={STEPS}", "train.ckpt_every=8"]


def _argv(bank: str, out: Path, *extra: str) -> list[str]:
    return ["--config", "tiny", "--bank", bank, "--out", str(out), *QUICK, *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def recon_run(phantom_bank, tmp_path_factory) -> Path:
    """An uninterrupted reconstruction run of STEPS steps (checkpoints at STEPS/2 and STEPS)."""
    out = tmp_path_factory.mktemp("recon") / "run"
    assert main(_argv(phantom_bank, out, *RECON)) == 0
    return out


def test_reconstruction_run_logs_finite_falling_loss(recon_run):
    rows = _metrics(recon_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["recon_mse"] == r["loss"]  # the only part
        assert "tversky" not in r and r["pairs_per_s"] > 0
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first, (first, last)
    events = EventAccumulator(str(next((recon_run / "tb").glob("events.out.tfevents.*"))))
    tags = events.Reload().Tags()
    assert "train/recon_mse" in tags["scalars"]
    assert "recon/masked_mask_pred_target" in tags["images"]


def test_reconstruction_checkpoint_holds_the_incontext_encoder(recon_run):
    ckpt = load_checkpoint(recon_run / "checkpoints" / "last.pt")  # weights_only=True
    assert ckpt["config"]["pretext"] == "reconstruction"
    assert ckpt["config"]["model"]["preset"] == "tiny"
    reference = {
        k: tuple(v.shape) for k, v in build_model("tiny").state_dict().items()
        if k.startswith("encoder.")
    }  # fmt: skip
    assert "encoder.stages.0.0.0.weight" in reference
    for state in (ckpt["model"], ckpt["ema"]["shadow"]):
        ours = {k: tuple(v.shape) for k, v in state.items() if k.startswith("encoder.")}
        assert ours == reference
    # The encoder loads into an in-context network of the same preset and is used as is.
    net = build_model("tiny")
    missing, unexpected = net.load_state_dict(
        {k: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}, strict=False
    )
    assert not unexpected and all(not k.startswith("encoder.") for k in missing)
    x = torch.randn(1, 1, 32, 32, 32)
    recon = create_pretext("reconstruction", load_config("tiny")).build_model("tiny")
    assert isinstance(recon, ReconstructionNet)
    recon.load_state_dict(ckpt["model"])
    with torch.no_grad():
        assert torch.equal(net.encoder(x)[-1], recon.encoder(x)[-1])


def test_reconstruction_resume_is_exact(phantom_bank, recon_run, tmp_path):
    half = recon_run / "checkpoints" / f"step_{STEPS // 2:08d}.pt"
    cut = tmp_path / "resumed"
    assert main(_argv(phantom_bank, cut, *RECON, "--resume-from", str(half))) == 0
    a = load_checkpoint(recon_run / "checkpoints" / "last.pt")
    b = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), key
    assert [r["loss"] for r in _metrics(cut)] == [r["loss"] for r in _metrics(recon_run)][8:]


def test_unknown_pretext_and_mismatched_resume_exit_2(phantom_bank, recon_run, tmp_path, capsys):
    assert sorted(PRETEXTS) == ["incontext", "reconstruction"]
    with pytest.raises(PretextError, match="unknown pretext 'jigsaw'"):
        create_pretext("jigsaw")
    assert main(_argv(phantom_bank, tmp_path / "r1", "pretext=jigsaw")) == 2
    err = capsys.readouterr().err
    assert "unknown pretext 'jigsaw'" in err and "reconstruction" in err
    assert not (tmp_path / "r1").exists()  # refused before anything was written
    # A reconstruction checkpoint resumed as in-context (the default) is refused, naming both.
    last = str(recon_run / "checkpoints" / "last.pt")
    assert main(_argv(phantom_bank, tmp_path / "r2", "--resume-from", last)) == 2
    err = capsys.readouterr().err
    assert "pretext=reconstruction" in err and "pretext=incontext" in err
    bad = ["pretext=reconstruction", "reconstruction.mask_ratio=1.5"]
    assert main(_argv(phantom_bank, tmp_path / "r3", *bad)) == 2
    assert "mask_ratio" in capsys.readouterr().err
    assert main(_argv(phantom_bank, tmp_path / "r4", "reconstruction.blok=4")) == 2
    assert "unknown config key 'reconstruction.blok'" in capsys.readouterr().err


def test_block_mask_zeroes_whole_blocks_reproducibly():
    def draw(seed: int) -> torch.Tensor:
        return block_mask(3, (32, 32, 32), 8, 0.6, torch.Generator().manual_seed(seed))

    mask = draw(0)
    assert mask.shape == (3, 1, 32, 32, 32) and mask.dtype == torch.bool
    n_mask = round(0.6 * 64)
    assert mask.flatten(1).sum(1).tolist() == [n_mask * 8**3] * 3
    blocks = mask.view(3, 4, 8, 4, 8, 4, 8)  # each 8^3 block all-or-nothing
    per_block = blocks.sum(dim=(2, 4, 6))
    assert set(per_block.unique().tolist()) == {0, 8**3}
    assert torch.equal(mask, draw(0)) and not torch.equal(mask, draw(1))
    assert not torch.equal(mask[0], mask[1])  # each crop draws its own blocks
    # A block that does not divide the crop: edge blocks are cut, shape kept.
    assert block_mask(2, (32, 32, 32), 12, 0.5, torch.Generator().manual_seed(0)).shape == (
        2, 1, 32, 32, 32
    )  # fmt: skip
    # Default block edge scales with the crop (a quarter of it).
    assert create_pretext("reconstruction", load_config("tiny")).block == 8
    assert create_pretext("reconstruction", load_config("base")).block == 32
