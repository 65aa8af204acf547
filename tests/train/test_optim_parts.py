import torch

from maskbank.train.lamb_optim import Lamb
from maskbank.train.optimizer_setup import one_cycle
from maskbank.train.weight_ema import WeightEMA


def test_lamb_minimises_a_quadratic():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 8))
    target = torch.randn(64, 8)
    opt = Lamb([w], lr=0.05, weight_decay=0.0)
    first = None
    for _ in range(100):
        loss = ((w - target) ** 2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * first


def test_one_cycle_warms_up_then_decays():
    lrs = [one_cycle(s, 100, 0.1) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == 1.0
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] < 0.05
    assert one_cycle(0, 2, 0.1) == 1.0  # very short runs do not divide by zero


def test_ema_tracks_weights_slowly():
    model = torch.nn.Linear(4, 2)
    ema = WeightEMA(model, decay=0.9)
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], start + 0.1, atol=1e-6)
    copy = torch.nn.Linear(4, 2)
    ema.copy_to(copy)
    assert torch.equal(copy.weight, ema.shadow["weight"])
