"""`maskbank segment` with a checkpoint of the resenc encoder (nnU-Net's ResidualEncoder)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("dynamic_network_architectures")

from maskbank.flows.cli import main  # noqa: E402


def _resenc_checkpoint(out):
    import torch

    from maskbank.train.checkpointing import save_checkpoint
    from maskbank.train.incontext_net import build_model
    from maskbank.train.run_config import TrainConfig

    torch.manual_seed(0)
    payload = {
        "model": build_model("resenc-tiny").state_dict(),
        "config": TrainConfig.load("resenc-tiny").to_dict(),
        "step": 0,
    }
    save_checkpoint(out / "checkpoints", 0, payload)
    return out


def test_segment_with_a_resenc_checkpoint(tmp_path, phantoms):
    run = _resenc_checkpoint(tmp_path / "run")
    ref_img, ref_lab = phantoms["ref0"]
    query = phantoms["q0"][0]
    out = tmp_path / "seg"
    argv = ["segment", "--checkpoint", str(run), "--reference", str(ref_img), str(ref_lab),
            "--labels", "3,4", "--spacing", "2", "--out", str(out), "--no-progress", str(query)]  # fmt: skip
    assert main(argv) == 0
    seg = nib.load(out / "q0_seg.nii.gz")
    assert seg.shape == nib.load(query).shape
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 3, 4}
