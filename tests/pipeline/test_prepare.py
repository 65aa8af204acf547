import json

import nibabel as nib
import numpy as np
import pytest

from maskbank.pipeline.body import body_mask
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.errors import ScanError
from maskbank.pipeline.modality import detect_modality
from maskbank.pipeline.normalize import apply_normalization, invert_normalization
from maskbank.pipeline.orient import to_ras
from maskbank.pipeline.phantom import NAMES, make_phantom
from maskbank.pipeline.prepare import prepare_scan
from maskbank.pipeline.resample import resample


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("modality", ["ct", "mr", "pet"])
def test_body_mask_recovers_phantom_body(modality):
    ph = make_phantom(modality, (64, 64, 48), seed=3)
    assert _dice(body_mask(ph.image, modality), ph.body) > 0.95


def test_modality_detection():
    assert detect_modality(make_phantom("ct", (48, 48, 32)).image) == "ct"
    assert detect_modality(make_phantom("mr", (48, 48, 32)).image) == "mr"


def test_config_round_trip_and_fingerprint():
    cfg = PrepareConfig(spacing=2.0, modality="ct")
    assert cfg.spacing == (2.0, 2.0, 2.0)
    again = PrepareConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert cfg.replace(spacing=[1.0, 1.0, 3.0]).fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="positive"):
        PrepareConfig(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="modality"):
        PrepareConfig(modality="xray")


def test_prepare_phantom_ct_end_to_end(tmp_path):
    ph = make_phantom("ct", (80, 80, 40), spacing=(1.0, 1.0, 3.0), seed=1)
    img_path, lab_path = ph.save_nifti(tmp_path)
    prep = prepare_scan(img_path, lab_path, config=PrepareConfig(spacing=1.5), dataset="phantoms")
    assert prep.attrs["modality"] == "ct" and prep.attrs["dataset"] == "phantoms"
    assert prep.image.dtype == np.float16 and prep.label.dtype == np.uint16
    assert prep.image.shape == prep.body.shape == prep.label.shape
    assert prep.attrs["original"]["shape"] == [80, 80, 40]
    assert len(prep.attrs["source_sha256"]) == 64
    # Labels travel with the image: each organ keeps its (normalised) HU.
    raw = invert_normalization(prep.image, prep.attrs["normalization"])
    liver = raw[prep.label == [k for k, v in NAMES.items() if v == "liver"][0]]
    assert abs(np.median(liver) - 60.0) < 15.0
    aorta = raw[prep.label == [k for k, v in NAMES.items() if v == "aorta"][0]]
    assert np.median(aorta) > 150.0
    # Body crop: every labelled structure is inside the crop and the body mask.
    assert (prep.label > 0).sum() > 0.8 * (ph.labels > 0).sum() * (1.0 * 1.0 * 3.0) / 1.5**3
    assert prep.body[prep.label > 0].mean() > 0.99
    # z-score inside the body
    norm = prep.image[prep.body].astype(np.float32)
    assert abs(norm.mean()) < 0.05 and abs(norm.std() - 1.0) < 0.05
    # The stored affine maps the cropped grid: voxel (0,0,0) sits at the crop start in world
    # space, on the resampled grid whose first centre is half an output voxel in from the
    # input's first edge (the input's first voxel centre is half an input voxel in).
    start = np.array([b[0] for b in prep.attrs["crop_box"]], float)
    first = ph.affine[:3, 3] + (1.5 - np.array([1.0, 1.0, 3.0])) / 2
    expected = np.diag([1.5, 1.5, 1.5]) @ start + first
    np.testing.assert_allclose(prep.affine[:3, 3], expected, atol=1e-6)


def test_pet_must_be_declared_and_uses_percentiles(tmp_path):
    ph = make_phantom("pet", (64, 64, 40), seed=2)
    img_path, _ = ph.save_nifti(tmp_path)
    auto = prepare_scan(img_path)
    assert auto.attrs["modality"] == "mr"
    pet = prepare_scan(img_path, config=PrepareConfig(modality="pet"))
    assert pet.attrs["modality"] == "pet"
    lo, hi = pet.attrs["normalization"]["clip"]
    assert 0.0 <= lo < hi < 9.0  # 98th percentile, below the hottest lesion


def test_label_on_another_grid_is_refused(tmp_path):
    ph = make_phantom("ct", (40, 40, 30))
    img_path, _ = ph.save_nifti(tmp_path)
    bad = tmp_path / "bad_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 29), np.uint8), ph.affine), bad)
    with pytest.raises(ScanError, match="label shape"):
        prepare_scan(img_path, bad)


def test_scan_without_body_is_refused(tmp_path):
    data = np.full((30, 30, 30), -1000.0, np.float32)
    data[0, 0, 0] = -999.0  # not constant, but no tissue
    path = tmp_path / "air.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(ScanError, match="no body found"):
        prepare_scan(path, config=PrepareConfig(modality="ct"))


@pytest.mark.parametrize("order", ["F", "C"])
def test_thick_slices_find_the_body_on_native_slices(tmp_path, order):
    """A 5 mm scan: body found before the slice up-sampling, image cropped before it.

    The image must equal resampling the whole volume and cropping afterwards; the body
    must match the one found on the final grid (interpolated slices add no evidence).
    """
    ph = make_phantom("ct", (90, 80, 16), spacing=(0.8, 0.8, 5.0), seed=5)
    data = np.pad(ph.image, ((30, 12), (25, 20), (0, 0)), constant_values=-1000.0)  # air around
    data = np.asarray(data, order=order)
    affine = ph.affine.copy()
    affine[0, :] *= -1  # an LPS-like file: the x axis flips on the way to RAS
    path = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    prep = prepare_scan(path, config=PrepareConfig(modality="ct"))
    full, full_aff = resample(np.asarray(nib.load(path).dataobj), affine, (1.5, 1.5, 1.5))
    full = to_ras(full, full_aff)[0]
    box = tuple(slice(a, b) for a, b in prep.attrs["crop_box"])
    want = apply_normalization(full[box], prep.attrs["normalization"], "float16")
    np.testing.assert_allclose(prep.image.astype(np.float32), want.astype(np.float32), atol=2e-3)
    fine = body_mask(full, "ct")[box]
    assert _dice(prep.body, fine) > 0.97
    assert prep.image.shape == prep.body.shape and prep.body.flags.c_contiguous
    assert box[0].start > 0 and box[1].start > 0 and box[0].stop < full.shape[0]  # cropped


@pytest.mark.realdata
def test_real_chest_ct_with_nodule(shared_data):
    prep = prepare_scan(
        shared_data / "ct_chest_lung1.nii.gz", shared_data / "ct_chest_lung1_nodule_label.nii.gz"
    )
    assert prep.attrs["modality"] == "ct"
    assert prep.attrs["original"]["spacing"][2] == pytest.approx(5.0, abs=0.01)
    nodule = prep.label > 0
    # 837 voxels of 0.57*0.57*5 mm -> about 1360 mm^3 -> about 400 voxels at 1.5 mm
    assert 250 < nodule.sum() < 600
    assert prep.body[nodule].all()
    raw = invert_normalization(prep.image, prep.attrs["normalization"])
    assert np.median(raw[nodule]) > -300  # a solid nodule, not lung air


@pytest.mark.realdata
def test_real_anisotropic_mr(shared_data):
    prep = prepare_scan(shared_data / "mr_brain_aniso_4x4x5mm.nii.gz")
    assert prep.attrs["modality"] == "mr"
    assert prep.image.shape[2] > 2 * 24 * 5.0 / 1.5 / 3  # upsampled along z
    assert 0.2 < prep.body.mean() < 0.9


def test_concurrent_prepares_give_back_torch_threads(tmp_path):
    """Streamed decoding lends one core away from torch; concurrent scans restore it once."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    paths = [
        make_phantom("ct", (96, 96, 40), spacing=(0.8, 0.8, 2.5), seed=s).save_nifti(
            tmp_path, f"p{s}"
        )[0]
        for s in range(3)
    ]
    before = torch.get_num_threads()
    with ThreadPoolExecutor(3) as pool:
        preps = list(pool.map(prepare_scan, paths))
    assert torch.get_num_threads() == before
    assert [p.attrs["modality"] for p in preps] == ["ct"] * 3
    # Same input, same result, whatever else ran at the same time.
    np.testing.assert_array_equal(preps[0].image, prepare_scan(paths[0]).image)


def test_scan_over_the_memory_budget_is_refused_with_the_estimate(tmp_path):
    """A 48x48x40 phantom at 3 mm asked for 0.5 mm: ~24 M voxels, far over a 64 MiB budget."""
    img_path, _ = make_phantom("ct", (48, 48, 40), spacing=(3.0, 3.0, 3.0), seed=2).save_nifti(
        tmp_path
    )
    tight = PrepareConfig(spacing=0.5, max_scan_memory="64M")
    with pytest.raises(ScanError, match=r"needs about \d+\.\d+ GiB of memory") as err:
        prepare_scan(img_path, config=tight)
    assert err.value.path == str(img_path)
    assert "budget of 0.06 GiB" in err.value.reason and "--max-scan-memory" in err.value.reason
    ok = prepare_scan(img_path, config=PrepareConfig(spacing=3.0, max_scan_memory="64M"))
    assert ok.attrs["config"]["max_scan_memory"] == 64 << 20


def test_budget_and_id_mode_leave_the_fingerprint_alone():
    base = PrepareConfig(spacing=2.0)
    assert base.replace(max_scan_memory="2G").fingerprint() == base.fingerprint()
    assert base.replace(id_from="hash").fingerprint() == base.fingerprint()
    assert PrepareConfig(max_scan_memory="1.5G").max_scan_memory == 3 << 29
    with pytest.raises(ValueError, match="size"):
        PrepareConfig(max_scan_memory="lots")


def test_estimate_counts_the_resampled_grid_not_only_the_input():
    from maskbank.pipeline.prepare import estimate_peak_bytes
    from maskbank.pipeline.reader import ScanHeader

    header = ScanHeader("x.nii", (64, 64, 64), (20.0, 20.0, 20.0), 4, 0, False)
    small = estimate_peak_bytes(header, (20.0, 20.0, 20.0))
    big = estimate_peak_bytes(header, (1.0, 1.0, 1.0))
    assert small["input"] == big["input"] == 64**3 * 4
    assert big["resampled"] >= 1280**3 * 16 and big["peak"] > 1000 * small["peak"]


def test_hashed_ids_keep_paths_out_of_the_attrs(tmp_path):
    img_path, lab_path = make_phantom("ct", (48, 48, 40), spacing=(3.0, 3.0, 3.0)).save_nifti(
        tmp_path / "patient-smith"
    )
    out = prepare_scan(img_path, lab_path, config=PrepareConfig(spacing=3.0, id_from="hash"))
    text = json.dumps(out.attrs)
    assert "patient-smith" not in text and out.attrs["source_sha256"]


@pytest.mark.parametrize(
    ("values", "dtype", "problem"),
    [
        (-1, np.int16, "non-negative integers"),
        (1.5, np.float32, "non-negative integers"),
        (70_000, np.int32, "70000 does not fit uint16"),
    ],
)
def test_label_values_that_cannot_be_labels_are_refused(tmp_path, values, dtype, problem):
    ph = make_phantom("ct", (32, 32, 24), spacing=(3.0, 3.0, 3.0), seed=4)
    img_path, _ = ph.save_nifti(tmp_path)
    lab = np.zeros(ph.image.shape, dtype)
    lab[10:20, 10:20, 8:16] = values
    bad = tmp_path / "bad_label.nii.gz"
    nib.save(nib.Nifti1Image(lab, nib.load(img_path).affine), bad)
    with pytest.raises(ScanError, match=problem) as err:
        prepare_scan(img_path, bad, config=PrepareConfig(spacing=3.0))
    assert err.value.path == str(bad)
