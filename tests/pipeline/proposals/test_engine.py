"""The proposal engine on synthetic phantoms with known structures, and bad inputs."""

import numpy as np
import pytest

from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.proposals.engine import ProposalConfig, generate_proposals
from maskbank.pipeline.proposals.quality import best_dice, score
from maskbank.pipeline.proposals.scaling import scale_plan

ORGANS = (
    "lung_right",
    "lung_left",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "spine",
    "aorta",
)


@pytest.fixture(scope="module")
def ct_phantom():
    return make_phantom("ct", shape=(96, 96, 80), spacing=(1.5, 1.5, 1.5), seed=0)


@pytest.fixture(scope="module")
def ct_proposals(ct_phantom):
    ph = ct_phantom
    return generate_proposals(ph.image, ph.body, ph.spacing, "ct", ProposalConfig())


def test_recovers_every_organ(ct_phantom, ct_proposals):
    ph, ps = ct_phantom, ct_proposals
    by_name = {v: k for k, v in ph.names.items()}
    for organ in ORGANS:
        d, i = best_dice(ps, ph.labels == by_name[organ])
        assert d >= 0.8, f"{organ}: best Dice {d:.3f}"
        np.testing.assert_array_equal(ps.mask(i).sum(), ps.table["voxels"][i])


def test_filters_hold(ct_phantom, ct_proposals):
    ph, ps = ct_phantom, ct_proposals
    assert ps.count > 500
    vox = ps.table["voxels"]
    plan = scale_plan(ProposalConfig(), int(ph.body.sum()), ph.spacing, "ct")
    assert plan.min_voxels == max(20, int(np.ceil(1e-5 * ph.body.sum())))
    assert vox.min() >= plan.min_voxels
    assert vox.max() <= 0.9 * ph.body.sum()
    ids = np.random.default_rng(0).choice(ps.count, 25, replace=False)
    for i in ids:
        m = ps.mask(i)
        assert (m & ph.body).sum() >= 0.9 * m.sum()
    # no kept pair is a near duplicate (check nested merge-tree neighbours, the likely ones)
    masks = ps.masks(np.argsort(vox)[-40:])
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    inter = flat @ flat.T
    union = flat.sum(1)[:, None] + flat.sum(1)[None] - inter
    iou = inter / union
    np.fill_diagonal(iou, 0)
    assert iou.max() <= 0.95
    assert set(ps.table["source"]) == {"hierarchy", "supervoxels", "windows"}
    assert np.isfinite(ps.table["compactness"]).all() and (ps.table["compactness"] <= 1).all()


@pytest.mark.parametrize("modality", ["mr", "pet"])
def test_mr_and_pet_phantoms(modality):
    ph = make_phantom(modality, shape=(80, 80, 64), spacing=(1.5, 1.5, 1.5), seed=0)
    ps = generate_proposals(ph.image, ph.body, ph.spacing, modality)
    sc = score(ps, ph.labels, ph.names)
    assert ps.count > 200
    assert sc["abo"] > 0.6, sc


def test_count_cap_and_config_round_trip():
    cfg = ProposalConfig(max_proposals=50, scales=(800,))
    assert ProposalConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.fingerprint() != ProposalConfig().fingerprint()
    ph = make_phantom("ct", shape=(64, 64, 48), spacing=(1.5, 1.5, 1.5), seed=1)
    ps = generate_proposals(ph.image, ph.body, ph.spacing, "ct", cfg)
    assert 0 < ps.count <= 50
    with pytest.raises(ValueError, match="unknown proposal generators"):
        ProposalConfig(generators=("sam2",))
    with pytest.raises(ValueError, match="unknown proposal config key 'nope'; valid keys"):
        ProposalConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match=r"'max_proposal'.*did you mean 'max_proposals'"):
        ProposalConfig.from_dict({"max_proposal": 5})
    # Options older versions recorded beside their proposals are tolerated, and dropped.
    old = {**cfg.to_dict(), "split_distance_mm": 15.0, "split_min_mm3": 50_000.0}
    assert ProposalConfig.from_dict(old) == cfg


def test_empty_body_gives_empty_set():
    img = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)
    ps = generate_proposals(img, np.zeros(img.shape, bool), (1.5, 1.5, 1.5), "ct")
    assert ps.count == 0


def test_constant_volume_does_not_crash():
    img = np.full((40, 40, 40), 40.0, np.float32)
    body = np.ones(img.shape, bool)
    ps = generate_proposals(img, body, (1.5, 1.5, 1.5), "ct")
    assert ps.count >= 0
    assert all(ps.table["voxels"] <= 0.9 * body.sum())


def test_one_voxel_thick_scan():
    ph = make_phantom("ct", shape=(96, 96, 80), spacing=(1.5, 1.5, 1.5), seed=0)
    img, body = ph.image[:, :, 40:41], ph.body[:, :, 40:41]
    ps = generate_proposals(img, body, (1.5, 1.5, 1.5), "ct")
    assert ps.shape == img.shape
    for i in range(min(ps.count, 5)):
        assert ps.mask(i).sum() == ps.table["voxels"][i]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same 3-D shape"):
        generate_proposals(np.zeros((4, 4, 4)), np.zeros((4, 4, 5), bool), (1, 1, 1), "ct")
    img = np.zeros((8, 8, 8), np.float32)
    img[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        generate_proposals(img, np.ones(img.shape, bool), (1, 1, 1), "ct")


def test_external_masks_mix_in_and_win_duplicates(ct_phantom):
    from maskbank.pipeline.proposals.external import from_label_map

    ph = ct_phantom
    expert = from_label_map(ph.labels, source="expert")
    ps = generate_proposals(ph.image, ph.body, ph.spacing, "ct", extra=[expert])
    assert "expert" in set(ps.table["source"])
    by_name = {v: k for k, v in ph.names.items()}
    for organ in ORGANS:
        d, i = best_dice(ps, ph.labels == by_name[organ])
        assert d == 1.0 and ps.table["source"][i] == "expert", organ
