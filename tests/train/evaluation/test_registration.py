"""The registration baseline on phantoms with a known deformation: real banks, real SimpleITK."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from maskbank.flows.demo_bank import _normalise
from maskbank.train.evaluation.metrics import dice
from maskbank.train.evaluation.registration import RegistrationBaseline, RegistrationSettings
from maskbank.train.evaluation.structures import find_classes, labelled_scans

from .conftest import SHAPE

SPACING = (2.0, 2.0, 2.0)
ORGANS = (1, 2, 3, 4, 7, 8)  # lungs, liver, spleen, spine, aorta: big enough to score stably


def _affine(angle_deg: float, scale: float, shift: tuple[float, float, float]):
    """(matrix, offset) of a rotation about the volume's centre, a scaling and a shift (voxels)."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    matrix = rot * scale
    centre = (np.asarray(SHAPE) - 1) / 2
    return matrix, centre - matrix @ centre + np.asarray(shift)


def _warped(image: np.ndarray, label: np.ndarray, angle: float, scale: float, shift) -> tuple:
    matrix, offset = _affine(angle, scale, shift)
    img = ndimage.affine_transform(image, matrix, offset, order=1, mode="nearest")
    lab = ndimage.affine_transform(label, matrix, offset, order=0, mode="constant", cval=0)
    return img, lab


def _write(bank, scan_id: str, image: np.ndarray, label: np.ndarray, modality: str) -> None:
    from maskbank.pipeline.phantom import NAMES

    body = image > np.percentile(image, 20)
    attrs = {
        "dataset": "reg",
        "modality": modality,
        "spacing": list(SPACING),
        "affine": np.diag([*SPACING, 1.0]).tolist(),
        "source_path": f"phantom://{scan_id}",
        "source_sha256": f"registration-{scan_id}",
        "fingerprint": "phantom",
        "label_names": {str(v): n for v, n in NAMES.items() if (label == v).any()},
    }
    arrays = {"image": _normalise(image, body), "body": body, "label": label.astype(np.uint16)}
    bank.write_scan(scan_id, arrays, attrs)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Query = CT phantom; references = the same anatomy under known affine deformations.

    ``ct-moved``/``mr-moved``: rotated 8 degrees, scaled 1.06, shifted (4, -3, 2) voxels,
    in CT and MR contrast. ``ct-other``: another affine deformation; ``ct-bent``: a smooth
    free-form deformation (up to 8 mm) and a shift; ``flat``: a constant image.
    """
    from maskbank.bank import Bank
    from maskbank.pipeline.phantom import make_phantom
    from maskbank.pipeline.synthetic_subjects import deformed_subject

    bank = Bank.create(tmp_path_factory.mktemp("registration") / "bank")
    ct = make_phantom("ct", shape=SHAPE, spacing=SPACING, seed=0, n_lesions=0)
    mr = make_phantom("mr", shape=SHAPE, spacing=SPACING, seed=0, n_lesions=0)
    assert np.array_equal(ct.labels, mr.labels)  # one anatomy, two contrasts
    _write(bank, "query", ct.image, ct.labels, "ct")
    _write(bank, "ct-moved", *_warped(ct.image, ct.labels, 8, 1.06, (4, -3, 2)), "ct")
    _write(bank, "mr-moved", *_warped(mr.image, mr.labels, 8, 1.06, (4, -3, 2)), "mr")
    _write(bank, "ct-other", *_warped(ct.image, ct.labels, -5, 0.97, (-3, 2, -2)), "ct")
    bent = deformed_subject(ct.image, ct.labels, SPACING, seed=5, max_displacement_mm=8.0)
    _write(bank, "ct-bent", *_warped(*bent, 0, 1.0, (3, 2, -2)), "ct")
    _write(bank, "flat", np.zeros(SHAPE, np.float32), ct.labels, "ct")
    return {s.scan_id: s for s in labelled_scans(bank)}


def _classes(scans):
    classes, _ = find_classes(list(scans.values()))
    return {c.value: c for c in classes}


def _organ_dice(probs: dict[int, np.ndarray], query) -> float:
    return float(np.mean([dice(probs[v] >= 0.5, query.mask(v)) for v in ORGANS]))


@pytest.mark.parametrize(
    ("reference", "floor"), [("ct-moved", 0.85), ("mr-moved", 0.85), ("ct-bent", 0.75)]
)
def test_known_deformation_is_recovered(scans, reference: str, floor: float) -> None:
    """Registered masks overlap the query's far better than the unregistered ones (CT and MR)."""
    query, ref = scans["query"], scans[reference]
    classes = _classes(scans)
    baseline = RegistrationBaseline()
    tasks = [(classes[v], [ref]) for v in ORGANS]
    probs = {}
    for ids, p in baseline.segment(query, tasks):
        assert p.shape == (len(ids), *query.image.shape) and p.dtype == np.float32
        assert p.min() >= 0 and p.max() <= 1
        probs[tasks[ids[0]][0].value] = p[0]
    identity = _organ_dice({v: ref.mask(v).astype(np.float32) for v in ORGANS}, query)
    registered = _organ_dice(probs, query)
    assert registered > floor and registered > identity + 0.15, (identity, registered)
    assert baseline.fallbacks == [] and baseline.registrations == 1
    stages = baseline.stages[(reference, "query")]
    assert stages[:2] == ["centre", "rigid"]
    if reference == "ct-bent":  # a free-form deformation needs the deformable stage
        assert stages[-1] == "bspline"


def test_the_deformable_stage_improves_on_affine_for_a_free_form_deformation(scans) -> None:
    query, ref = scans["query"], scans["ct-bent"]
    classes = _classes(scans)
    tasks = [(classes[v], [ref]) for v in ORGANS]
    scores = {}
    for deformable in (False, True):
        baseline = RegistrationBaseline(RegistrationSettings(deformable=deformable))
        probs = {tasks[ids[0]][0].value: p[0] for ids, p in baseline.segment(query, tasks)}
        scores[deformable] = _organ_dice(probs, query)
    assert scores[True] > scores[False], scores


def test_masks_are_warped_with_the_registered_transform(scans) -> None:
    """The boxed, field-sampled warp equals resampling the whole grid with the transform."""
    import SimpleITK as sitk

    from maskbank.train.evaluation.registration import to_sitk

    query, ref = scans["query"], scans["ct-bent"]
    baseline = RegistrationBaseline()
    transform = baseline.transform(ref, query)
    grid = to_sitk(np.zeros(query.image.shape, np.float32), query.spacing)
    for value in (3, 6, 8):  # liver, a kidney, the aorta
        mask = to_sitk(ref.mask(value), ref.spacing)
        exact = sitk.GetArrayFromImage(sitk.Resample(mask, grid, transform, sitk.sitkLinear, 0.0))
        warped = baseline.warp_mask(ref, value, query)
        assert warped.shape == query.image.shape and exact.max() > 0.9
        assert np.abs(warped - exact).max() < 0.05
        assert np.count_nonzero((warped >= 0.5) != (exact >= 0.5)) <= 0.01 * (exact >= 0.5).sum()


def test_k_shot_fusion_is_the_mean_of_the_warped_masks(scans) -> None:
    query, refs = scans["query"], [scans["ct-moved"], scans["ct-other"]]
    liver = _classes(scans)[3]
    baseline = RegistrationBaseline()
    [(ids, fused)] = list(baseline.segment(query, [(liver, refs)]))
    warped = [baseline.warp_mask(r, liver.value, query) for r in refs]
    assert ids == [0]
    np.testing.assert_allclose(fused[0], (warped[0] + warped[1]) / 2, atol=1e-6)
    # The two references disagree somewhere, so the mean is not either of them.
    assert np.abs(warped[0] - warped[1]).max() > 0.5
    assert dice(fused[0] >= 0.5, query.mask(liver.value)) > 0.85


def test_one_registration_per_reference_and_query(scans) -> None:
    """Every class of a reference reuses the pair's transform; a new query registers anew."""
    classes = _classes(scans)
    baseline = RegistrationBaseline()
    refs = [scans["ct-moved"], scans["ct-other"]]
    tasks = [(classes[v], refs) for v in (1, 3, 7)]
    assert len(list(baseline.segment(scans["query"], tasks))) == 3
    assert baseline.registrations == 2
    first = baseline.transform(scans["ct-moved"], scans["query"])
    list(baseline.segment(scans["query"], tasks[:1]))
    assert baseline.registrations == 2
    assert baseline.transform(scans["ct-moved"], scans["query"]) is first
    list(baseline.segment(scans["mr-moved"], [(classes[3], [scans["ct-moved"]])]))
    assert baseline.registrations == 3
    assert set(baseline.stages) == {
        ("ct-moved", "query"),
        ("ct-other", "query"),
        ("ct-moved", "mr-moved"),
    }


def test_a_failed_registration_falls_back_to_centre_alignment_and_is_counted(scans) -> None:
    query, flat = scans["query"], scans["flat"]
    liver = _classes(scans)[3]
    baseline = RegistrationBaseline()
    [(_, prob)] = list(baseline.segment(query, [(liver, [flat])]))
    assert len(baseline.fallbacks) == 1 and baseline.stats()["fallbacks"] == 1
    case = baseline.fallbacks[0]
    assert case["reference"] == "flat" and case["query"] == "query"
    assert "constant" in case["reason"]
    assert baseline.stages[("flat", "query")] == ["centre (fallback)"]
    # Same grid: centre alignment is the identity, so the mask comes back unchanged.
    np.testing.assert_array_equal(prob[0] >= 0.5, flat.mask(liver.value))


def test_settings_and_speed_are_recorded(scans) -> None:
    settings = RegistrationSettings(deformable=False, rigid_iterations=20, affine_iterations=20)
    baseline = RegistrationBaseline(settings)
    assert baseline.label == "registration" and baseline.crop is None
    assert baseline.config["deformable"] is False and baseline.config["rigid_iterations"] == 20
    baseline.transform(scans["ct-moved"], scans["query"])
    stats = baseline.stats()
    assert stats["registrations"] == 1 and stats["seconds_per_registration"] > 0
    assert "bspline" not in baseline.stages[("ct-moved", "query")]
    json.dumps({"config": baseline.config, "stats": stats})  # results.json can hold both
    # A large scan registers on a coarser working grid, so its cost stays bounded.
    from maskbank.train.evaluation.registration import to_sitk, working_image

    image = to_sitk(scans["query"].image, SPACING)
    assert working_image(image, 3.0, 10**9).GetSize() == (20, 24, 24)  # 2-voxel bins, axes reversed
    capped = working_image(image, 3.0, 2000)
    assert math.prod(capped.GetSize()) <= 2000 and capped.GetSpacing()[0] > 4.0
    with pytest.raises(ValueError, match="shrink and smoothing"):
        RegistrationSettings(shrink=(2, 1), smoothing=(1.0,))
    with pytest.raises(ValueError, match="sampling"):
        RegistrationSettings(sampling=0)
