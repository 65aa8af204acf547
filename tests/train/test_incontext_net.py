import torch

from maskbank.train.incontext_net import PRESETS, build_model, count_parameters
from maskbank.train.seg_loss import segmentation_loss


def _inputs(n=1, k=4, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 1, s, s, s, generator=g)
    masks = torch.rand(n, k, s, s, s, generator=g) > 0.7
    return img, masks, torch.randn(n, 1, s, s, s, generator=g)


def test_tiny_shapes_and_gradients():
    torch.manual_seed(0)
    model = build_model("tiny")
    ref, masks, query = _inputs(n=2, k=5)
    out = model(ref, masks, query)
    assert out.shape == (2, 5, 32, 32, 32)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tiny_fits_fixed_pairs():
    """The network can learn the pretext: on fixed pairs whose query is the shifted reference,
    the preset's loss falls well within 40 Adam steps (the readout has to carry the masks)."""
    torch.manual_seed(0)
    model = build_model("tiny")
    ref, masks, _ = _inputs(n=2, k=4)
    masks = torch.zeros_like(masks)
    for i, (z, y, x) in enumerate([(4, 4, 4), (16, 6, 10), (8, 18, 16), (18, 16, 4)]):
        masks[:, i, z : z + 10, y : y + 10, x : x + 10] = True
    query, target = ref.roll(3, dims=2), masks.roll(3, dims=2).float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = segmentation_loss(model(ref, masks, query), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_tasks_are_permutation_equivariant():
    """All K tasks run in one pass but independently: permuting masks permutes logits."""
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    ref, masks, query = _inputs(k=4)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = model(ref, masks, query)
        b = model(ref, masks[:, perm], query)
    assert torch.allclose(a[:, perm], b, atol=1e-5)
    assert not torch.allclose(a[:, 0], a[:, 1], atol=1e-3)  # masks matter


def test_preset_sizes():
    sizes = {name: count_parameters(build_model(name)) for name in ("tiny", "small")}
    assert sizes["tiny"] < 1_000_000 < sizes["small"]
    base = PRESETS["base"]
    assert base.channels[0] == 32 and base.channels[-1] == 512
    n_base = count_parameters(build_model("base"))
    assert 100e6 < n_base < 140e6, n_base


def test_bf16_autocast_forward():
    """The GPU path runs under bf16 autocast; mixed dtypes must not break any block."""
    torch.manual_seed(0)
    model = build_model("tiny")
    ref, masks, query = _inputs(k=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ref, masks, query)
    assert out.shape == (1, 3, 32, 32, 32)
    assert torch.isfinite(out.float()).all()


def test_per_task_decoding_keeps_tasks_apart():
    """Per-task passes: a task's logits depend on its own mask only (the joint decoder mixes
    them), with the same weights as the joint network."""
    from dataclasses import replace

    from maskbank.train.incontext_net import InContextSegNet

    torch.manual_seed(0)
    joint = build_model("tiny").eval()
    per = InContextSegNet(replace(PRESETS["tiny"], per_task=True)).eval()
    per.load_state_dict(joint.state_dict())
    ref, masks, query = _inputs(k=3)
    other = masks.clone()
    other[:, 1] = ~other[:, 1]
    with torch.no_grad():
        a, b = per(ref, masks, query), per(ref, other, query)
        ja, jb = joint(ref, masks, query), joint(ref, other, query)
    assert a.shape == (1, 3, 32, 32, 32)
    assert torch.allclose(a[:, [0, 2]], b[:, [0, 2]], atol=1e-5)
    assert not torch.allclose(a[:, 1], b[:, 1], atol=1e-3)
    assert not torch.allclose(ja[:, 0], jb[:, 0], atol=1e-5)
    # One task alone gives the same logits as in company.
    alone = per(ref, masks[:, :1], query)
    assert torch.allclose(alone[:, 0], a[:, 0], atol=1e-4)  # other batch, other reductions


def test_similarity_prior_marks_voxels_like_the_reference_structure():
    """The prior alone (decoder silenced) is higher where the query repeats the reference's
    structure than elsewhere, from the first step."""
    from dataclasses import replace

    from maskbank.train.incontext_net import InContextSegNet

    torch.manual_seed(0)
    net = InContextSegNet(replace(PRESETS["tiny"], prior_levels=(0, 2))).eval()
    assert net.prior_scale is not None and build_model("tiny").prior_scale is None
    img = torch.randn(1, 1, 32, 32, 32) * 0.1
    img[..., 8:16, 8:16, 8:16] += 3.0  # a bright cube: the structure
    masks = torch.zeros(1, 1, 32, 32, 32, dtype=torch.bool)
    masks[..., 8:16, 8:16, 8:16] = True
    with torch.no_grad():
        feats = net.encoder(torch.cat([img, img]))
        tasks = net._tasks([f[:1] for f in feats], masks)
        prior = net._prior([f[1:] for f in feats], tasks)[0, 0]
    inside = prior[9:15, 9:15, 9:15].mean()
    outside = prior[20:, 20:, 20:].mean()
    assert inside > outside + 1.0, (inside, outside)
