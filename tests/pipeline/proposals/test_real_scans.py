"""Proposals on the real scans in ../shared/data: MNI152 grey/white matter and a lung nodule."""

from pathlib import Path

import numpy as np
import pytest

from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.normalize import invert_normalization
from maskbank.pipeline.prepare import prepare_scan
from maskbank.pipeline.proposals.engine import generate_proposals
from maskbank.pipeline.proposals.quality import score

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
pytestmark = pytest.mark.realdata


def _need(*names: str) -> list[Path]:
    paths = [DATA / n for n in names]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"real scans not available in {DATA}: {missing}")
    return paths


def _bytes_per_proposal(p, ps, tmp_path) -> float:
    """As stored in a real bank on disk (the proposals part only)."""
    from maskbank.bank import Bank
    from maskbank.bank.sampling import ProposalReader
    from maskbank.bank.writing import write_proposals

    bank = Bank.create(tmp_path / "bank")
    bank.write_scan("s", p.arrays(), p.attrs)
    write_proposals(bank, "s", ps)
    pr = ProposalReader(bank.scan("s"))
    return pr.nbytes_stored() / max(pr.count, 1)


def _proposals(image, label, modality, tmp_path=None, spacing=2.0):
    p = prepare_scan(image, label, config=PrepareConfig(spacing=spacing, modality=modality))
    raw = invert_normalization(p.image, p.attrs["normalization"])
    return p, generate_proposals(raw, p.body, p.spacing, modality)


def test_mni152_grey_and_white_matter(tmp_path):
    import nibabel as nib

    t1, gm, wm = _need(
        "mr_brain_mni152_t1_1mm.nii.gz",
        "mr_brain_mni152_gm_prob_1mm.nii.gz",
        "mr_brain_mni152_wm_prob_1mm.nii.gz",
    )
    ref = nib.load(t1)
    lab = np.zeros(ref.shape, np.uint8)
    lab[np.asarray(nib.load(gm).dataobj) >= 128] = 1  # probability >= 50 %
    lab[np.asarray(nib.load(wm).dataobj) >= 128] = 2
    nib.save(nib.Nifti1Image(lab, ref.affine), tmp_path / "label.nii.gz")
    p, ps = _proposals(t1, tmp_path / "label.nii.gz", "mr")
    sc = score(ps, p.label, {1: "grey_matter", 2: "white_matter"})
    assert ps.count > 200
    assert sc["structures"]["white_matter"] >= 0.8, sc["structures"]
    assert sc["structures"]["grey_matter"] >= 0.55, sc["structures"]
    assert _bytes_per_proposal(p, ps, tmp_path) <= 200


def test_chest_ct_nodule_is_found(tmp_path):
    img, lab = _need("ct_chest_lung1.nii.gz", "ct_chest_lung1_nodule_label.nii.gz")
    p, ps = _proposals(img, lab, "ct")
    sc = score(ps, p.label, {1: "nodule"})
    assert ps.count > 300
    assert sc["structures"]["nodule"] >= 0.6, sc["structures"]
    assert _bytes_per_proposal(p, ps, tmp_path) <= 200
