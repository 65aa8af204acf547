"""The notebook API of a scan: lazy arrays, proposal masks, NIfTI export, the viewer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from maskbank.bank import Bank, NoProposalsError
from maskbank.bank.sampling import ProposalReader
from maskbank.bank.writing import write_proposals
from maskbank.flows.demo_bank import build_phantom_bank
from maskbank.pipeline.proposals.external import from_masks
from maskbank.pipeline.proposals.features import compute_features


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """One phantom scan with its default proposals and a second set 'boxes': two boxes
    (the second inside the first) that no default proposal matches."""
    root = tmp_path_factory.mktemp("nb") / "bank"
    build_phantom_bank(str(root), n_scans=1, shape=(48, 40, 32))
    bank = Bank.create(str(root))  # opens the existing bank for writing
    sid = bank.scan_ids[0]
    big, small = np.zeros((48, 40, 32), bool), np.zeros((48, 40, 32), bool)
    big[2:30, 3:33, 1:20] = True
    small[10:20, 10:20, 10:20] = True
    boxes = compute_features(from_masks([big, small], "boxes"), None, None)
    write_proposals(bank, sid, boxes, name="boxes")
    return Bank.open(str(root)).scan(sid)


def _boxes(scan) -> np.ndarray:
    """The 'boxes' set's two masks, in id order."""
    return ProposalReader(scan, "boxes").masks([0, 1])


def test_lazy_arrays_slice_like_numpy(scan):
    full = scan.read("image")
    assert scan.image.shape == full.shape and scan.image.dtype == full.dtype
    assert np.array_equal(scan.image[:, :, 7], full[:, :, 7])
    assert np.array_equal(scan.image[5:9, ::2, 3], full[5:9, ::2, 3])
    assert np.array_equal(np.asarray(scan.body), scan.read("body"))
    assert np.array_equal(scan.label[10], scan.read("label")[10])
    dask_image = scan.image.to_dask()
    assert dask_image.chunksize == tuple(
        min(c, n) for c, n in zip(scan.image.chunks, full.shape, strict=True)
    )
    assert float(dask_image.sum().compute()) == pytest.approx(float(full.sum()), rel=1e-5)
    assert "LazyArray" in repr(scan.image)


def test_proposal_masks_match_the_reader(scan):
    from maskbank.bank.sampling import ProposalReader

    reader = ProposalReader(scan)
    masks = scan.proposal_masks([0, 2], roi=(slice(4, 20), slice(None), slice(0, 10)))
    assert masks.shape == (2, 16, 40, 10) and masks.dtype == bool
    assert np.array_equal(masks[1], reader.mask(2)[4:20, :, :10])
    assert np.array_equal(scan.proposal_mask(1), reader.mask(1))


def test_to_nifti_lands_on_the_bank_grid(scan, tmp_path):
    roi = (slice(8, 40), slice(4, 36), slice(2, 30))
    ids = [0, 3]
    paths = scan.to_nifti(tmp_path / "ct.nii.gz", roi=roi, proposals=ids)
    assert paths["masks"].name == "ct_masks.nii.gz"
    img, lab = nib.load(paths["image"]), nib.load(paths["masks"])
    assert np.array_equal(np.asarray(img.dataobj), scan.read("image", roi))
    world_of_first = np.asarray(scan.affine) @ np.array([8, 4, 2, 1.0])
    assert np.allclose(img.affine @ np.array([0, 0, 0, 1.0]), world_of_first)
    assert np.allclose(lab.affine, img.affine)
    labels = np.asarray(lab.dataobj)
    masks = scan.proposal_masks(ids, roi=roi)
    assert np.array_equal(labels == 2, masks[1])
    assert np.array_equal(labels == 1, masks[0] & ~masks[1])  # the later id wins overlaps
    label_paths = scan.to_nifti(tmp_path / "lab.nii", proposals="label")
    assert np.array_equal(np.asarray(nib.load(label_paths["masks"]).dataobj), scan.read("label"))
    with pytest.raises(ValueError, match=r"\.nii"):
        scan.to_nifti(tmp_path / "ct.png")


def test_show_falls_back_to_a_static_figure(scan):
    from matplotlib.figure import Figure

    fig = scan.show(proposals=[0, 1], viewer="static")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    with pytest.raises(ValueError, match="viewer must be"):
        scan.show(viewer="vtk")


def test_show_opens_niivue_with_an_overlay(scan):
    pytest.importorskip("ipyniivue", reason="the optional notebook extra is not installed")
    widget = scan.show(proposals=[0, 1])
    assert type(widget).__name__ == "NiiVue"
    names = [v.name for v in widget.volumes]
    assert names == [f"{scan.scan_id}.nii", f"{scan.scan_id}_masks.nii"]
    assert widget.volumes[0].data[:4] == (348).to_bytes(4, "little")  # a NIfTI-1 header


def test_every_view_draws_from_the_named_set(scan, tmp_path):
    from matplotlib.figure import Figure

    assert scan.proposal_sets == ["boxes", "default"]
    boxes = _boxes(scan)
    assert sorted(int(m.sum()) for m in boxes) == [10 * 10 * 10, 28 * 30 * 19]
    assert not np.array_equal(scan.proposal_masks([0, 1]), boxes)  # another set, other masks
    assert np.array_equal(scan.proposal_mask(1, "boxes"), boxes[1])
    labels = scan.overlay([0, 1], proposal_set="boxes")
    assert np.array_equal(labels == 2, boxes[1])
    assert np.array_equal(labels == 1, boxes[0] & ~boxes[1])
    roi = (slice(8, 24), slice(None), slice(4, 16))
    paths = scan.to_nifti(tmp_path / "b.nii.gz", roi=roi, proposals=[0, 1], proposal_set="boxes")
    assert np.array_equal(np.asarray(nib.load(paths["masks"]).dataobj), labels[roi])
    fig = scan.show(proposals=[0, 1], viewer="static", proposal_set="boxes")
    assert isinstance(fig, Figure)
    axial = fig.axes[2].images[1].get_array()  # the mid axial slice, z = 16, cuts both boxes
    expect = labels[:, :, 16].T
    assert set(np.unique(expect)) == {0, 1, 2}
    assert np.array_equal(np.ma.getmaskarray(axial), expect == 0)
    assert np.array_equal(axial.filled(0), expect)
    with pytest.raises(NoProposalsError, match=r"'slic'.*its sets: 'boxes', 'default'"):
        scan.show(proposals=[0], viewer="static", proposal_set="slic")
    with pytest.raises(ValueError, match=r"proposal_set='boxes'"):
        scan.show(proposals="boxes", viewer="static")  # a set is not an array to overlay


def test_scan_and_bank_pages_count_every_set(scan):
    n_default = scan.bank.row(scan.scan_id)["n_proposals"]
    assert f"proposals: boxes 2, default {n_default}" in scan._repr_html_()
    assert f"<td>boxes 2, default {n_default}</td>" in scan.bank._repr_html_()
