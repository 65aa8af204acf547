"""`evaluate finetune --save-model DIR`, then `segment --checkpoint DIR` with no references."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from maskbank.flows.cli import main
from maskbank.flows.segment import SegmentError, segment

from .conftest import write_checkpoint


def _labelled_bank(path, n: int = 4) -> str:
    """``n`` CT phantoms of one dataset with organ labels and names (a bank as prepare makes)."""
    from maskbank.bank import Bank
    from maskbank.flows.demo_bank import _normalise
    from maskbank.pipeline.phantom import NAMES, make_phantom

    bank = Bank.create(path)
    for seed in range(n):
        ph = make_phantom("ct", shape=(40, 40, 32), spacing=(2.0, 2.0, 2.0), seed=seed)
        attrs = {
            "dataset": "phantom-ct",
            "modality": "ct",
            "spacing": list(ph.spacing),
            "affine": ph.affine.tolist(),
            "source_sha256": f"phantom-ct-{seed}",
            "label_names": {str(v): n for v, n in NAMES.items() if (ph.labels == v).any()},
        }
        arrays = {"image": _normalise(ph.image, ph.body), "body": ph.body, "label": ph.labels}
        bank.write_scan(f"ct-{seed:02d}", arrays, attrs)
    bank.rebuild_index()
    return str(path)


@pytest.mark.slow
def test_a_saved_finetuned_network_segments_without_references(tmp_path, phantoms, capsys):
    from maskbank.pipeline.phantom import NAMES

    run = write_checkpoint(tmp_path / "run", seed=0)
    bank = _labelled_bank(tmp_path / "bank")
    model_dir = tmp_path / "ft"
    argv = ["evaluate", "finetune", "--checkpoint", str(run), "--bank", bank, "--no-baseline"]
    argv += ["--fractions", "1.0", "--steps", "2", "--val-every", "2", "--lr-grid", "1e-3"]
    argv += ["--device", "cpu", "--no-progress", "--save-model", str(model_dir)]
    assert main(argv) == 0, capsys.readouterr().err
    config = json.loads((model_dir / "model.json").read_text())
    assert config["spacing"] == [2.0, 2.0, 2.0] and config["modality"] == "ct"
    assert config["names"] == [NAMES[v] for v in config["values"]] and len(config["values"]) > 3
    query = str(phantoms["q1"][0])  # another grid (2.5 x 1.8 x 2.4 mm)
    results = list(segment(str(model_dir), [query], out=tmp_path / "seg"))
    assert [r.status for r in results] == ["ok"]
    assert results[0].labels == dict(zip(config["values"], config["names"], strict=True))
    seg = nib.load(results[0].seg_path)
    src = nib.load(query)
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, *config["values"]}
    record = json.loads((tmp_path / "seg" / "q1_seg.json").read_text())
    assert record["spacing_source"] == "the fine-tuned network"
    with pytest.raises(SegmentError, match="takes no --reference"):
        segment(str(model_dir), [query], references=[(query, query)], out=tmp_path / "x")
