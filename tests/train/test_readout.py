import torch

from maskbank.train.incontext_net import PRESETS, InContextSegNet, TaskEmbedding, build_model
from maskbank.train.readout import PropagationReadout


def _inputs(n=1, k=3, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 1, s, s, s, generator=g)
    masks = (torch.rand(n, k, s, s, s, generator=g) > 0.7).float()
    return img, masks, torch.randn(n, 1, s, s, s, generator=g)


def test_presets_use_the_propagation_readout():
    for name in ("tiny", "small", "base"):
        assert PRESETS[name].readout == "propagation"
    assert build_model("tiny").readout is not None


def test_a_query_equal_to_the_reference_gets_its_masks_back():
    torch.manual_seed(0)
    readout = PropagationReadout(dim=16, key_dim=16, temperature=0.01)
    feat = torch.randn(1, 16, 4, 4, 4)
    masks = (torch.rand(1, 2, 64) > 0.5).float()
    keys = readout.keys(feat)
    prop = readout.propagate(keys, keys[:, None], masks)
    assert torch.allclose(prop, masks, atol=1e-3)


def test_padded_memory_positions_are_never_attended():
    torch.manual_seed(0)
    readout = PropagationReadout(dim=8, key_dim=8)
    q = readout.keys(torch.randn(1, 8, 2, 2, 2))
    mem = readout.keys(torch.randn(1, 8, 2, 2, 2))[:, None].expand(1, 2, -1, -1)
    masks = torch.rand(1, 2, 8)
    padded_keys = torch.cat([mem, torch.zeros(1, 2, 5, 8)], 2)
    padded_masks = torch.cat([masks, torch.ones(1, 2, 5)], 2)
    assert torch.allclose(
        readout.propagate(q, mem, masks), readout.propagate(q, padded_keys, padded_masks), atol=1e-6
    )


def test_encoded_reference_and_segment_match_forward():
    torch.manual_seed(0)
    net = build_model("tiny").eval()
    ref, masks, query = _inputs()
    with torch.no_grad():
        direct = net(ref, masks, query)
        tasks = net.encode_tasks(ref, masks)
        assert tasks.mem_keys.shape[1] == 1  # one reference: keys shared by the tasks
        assert torch.allclose(net.segment(query, tasks), direct, atol=1e-5)


def test_tasks_from_different_references_and_several_shots():
    """Classes with their own references are joined per task; shots join their memories."""
    torch.manual_seed(0)
    net = build_model("tiny").eval()
    ref_a, masks_a, query = _inputs(seed=1)
    ref_b, masks_b, _ = _inputs(seed=2)
    with torch.no_grad():
        a, b = net.encode_tasks(ref_a, masks_a), net.encode_tasks(ref_b, masks_b)
        joined = TaskEmbedding.cat([a.select([0]), b.select([1])])
        assert joined.mem_keys.shape[:2] == (1, 2)
        prop = net._readout(net.encoder(query), joined)
        alone_b = net._readout(net.encoder(query), b.select([1]))
        assert torch.allclose(prop[:, 1], alone_b[:, 0], atol=1e-5)
        shots = TaskEmbedding.cat_batch([a.select([0]), b.select([0])]).mean()
        assert shots.mem_masks.shape == (1, 1, 2 * a.mem_masks.shape[-1])
        assert net.segment(query.expand(2, -1, -1, -1, -1), shots).shape == (2, 1, 32, 32, 32)


def test_refinement_option_trains():
    from dataclasses import replace

    torch.manual_seed(0)
    net = InContextSegNet(replace(PRESETS["tiny"], readout_refine=4))
    ref, masks, query = _inputs(n=2)
    net(ref, masks, query).mean().backward()
    assert net.refine.out.weight.grad is not None


def test_joined_global_tasks_keep_one_memory():
    """All-ones tasks from several references (the global task) keep one shot's memory,
    padding included, instead of every reference's positions."""
    torch.manual_seed(0)
    net = build_model("tiny").eval()
    ref_a, masks_a, _ = _inputs(seed=1)
    ref_b, masks_b, _ = _inputs(seed=2)
    masks_a[:, -1] = 1
    masks_b[:, -1] = 1
    with torch.no_grad():
        a, b = net.encode_tasks(ref_a, masks_a), net.encode_tasks(ref_b, masks_b)
        shots = TaskEmbedding.cat_batch([a, b]).mean()  # class + global of two shots
        joined = TaskEmbedding.cat_batch([shots.select([2]), a.select([2])]).mean()
    assert joined.mem_masks.shape == (1, 1, a.mem_masks.shape[-1] * 2)
    assert joined.mem_keys.shape[0] == 1


def test_padded_memory_keeps_gradients_finite():
    torch.manual_seed(0)
    readout = PropagationReadout(dim=8, key_dim=8)
    feats = torch.randn(1, 8, 2, 2, 2), torch.randn(1, 8, 2, 2, 2)
    for shared in (False, True):
        readout.zero_grad()
        q = readout.keys(feats[0])
        mem = readout.keys(feats[1])[:, None].expand(1, 2, -1, -1)
        keys = torch.cat([mem, torch.zeros(1, 2, 5, 8)], 2)
        keys = keys[:, :1] if shared else keys
        readout.propagate(q, keys, torch.rand(1, 2, 13)).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in readout.parameters() if p.grad is not None)


def test_context_keys_see_the_coarser_level():
    from dataclasses import replace

    assert PRESETS["tiny"].readout_context
    torch.manual_seed(0)
    net = build_model("tiny").eval()
    assert net.readout.key.in_features == 32 + 32  # tiny's levels 2 and 3
    plain = InContextSegNet(replace(PRESETS["tiny"], readout_context=False))
    assert plain.readout.key.in_features == 32
    ref, masks, query = _inputs()
    with torch.no_grad():
        assert net(ref, masks, query).shape == plain(ref, masks, query).shape


def test_readout_gain_reads_a_partly_covered_cell_as_more_present():
    """``readout_gain`` g: the memory holds min(1, g * occupancy); 1 is plain occupancy."""
    from dataclasses import replace

    from maskbank.train.incontext_net import mask_occupancy

    ref, masks, _ = _inputs()
    lv = PRESETS["tiny"].readout_level
    occupancy = mask_occupancy(masks, lv).flatten(2)
    plain = build_model("tiny").eval()
    gained = build_model(replace(PRESETS["tiny"], readout_gain=4.0)).eval()
    with torch.no_grad():
        assert torch.allclose(plain.encode_tasks(ref, masks).mem_masks, occupancy)
        mem = gained.encode_tasks(ref, masks).mem_masks
    assert torch.allclose(mem, (4 * occupancy).clamp(max=1))
    assert (mem > occupancy).any() and mem.max() <= 1
