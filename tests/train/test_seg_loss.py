import torch

from maskbank.train.seg_loss import adaptive_tversky_loss, segmentation_loss


def test_perfect_prediction_beats_wrong_one():
    target = torch.zeros(1, 2, 8, 8, 8)
    target[:, 0, 2:6, 2:6, 2:6] = 1
    good = (target * 2 - 1) * 20
    bad = -good
    assert segmentation_loss(good, target)[0] < 0.01
    assert segmentation_loss(bad, target)[0] > 1.0


def test_alpha_adapts_to_dominant_error():
    """More FP than FN -> alpha clamps at 0.8 and FP costs more than plain Dice would charge."""
    target = torch.zeros(1, 1, 10, 10, 10)
    target[..., :2, :, :] = 1  # 200 voxels
    pred = torch.zeros_like(target)
    pred[..., :6, :, :] = 1  # all TP plus 400 FP
    logits = (pred * 2 - 1) * 30
    tp, fp = 200.0, 400.0
    dice_loss = 1 - (tp + 1) / (tp + 0.5 * fp + 1)
    tversky_loss = 1 - (tp + 1) / (tp + 0.8 * fp + 1)
    got = float(adaptive_tversky_loss(logits, target))
    assert abs(got - tversky_loss) < 1e-3
    assert got > dice_loss


def test_empty_targets_are_taught_by_the_voxel_term():
    """An absent structure: predicting it anywhere must cost clearly more than predicting
    nothing, and the gradient must push false alarms down; the region term ignores it."""
    target = torch.zeros(1, 2, 8, 8, 8)
    target[:, 0, 2:6, 2:6, 2:6] = 1  # task 1 absent
    base = (target * 2 - 1) * 10
    alarm = base.clone()
    alarm[:, 1, :4] = 10.0  # half the crop predicted for the absent task
    quiet, parts = segmentation_loss(base, target)
    loud, loud_parts = segmentation_loss(alarm, target)
    assert loud - quiet > 2.0
    assert loud_parts["tversky"] == parts["tversky"]  # only the present task's region term
    logits = alarm.clone().requires_grad_(True)
    segmentation_loss(logits, target)[0].backward()
    assert float(logits.grad[:, 1, :4].min()) > 0  # descent lowers the false alarm's logits


def test_all_absent_batch_is_finite_and_weights_apply():
    target = torch.zeros(2, 3, 8, 8, 8)
    logits = torch.zeros_like(target)
    loss, parts = segmentation_loss(logits, target)
    assert torch.isfinite(loss) and parts["tversky"] == 0.0
    only_bce, _ = segmentation_loss(logits, target, tversky_weight=0.0, bce_weight=2.0)
    assert abs(float(only_bce) - 2 * parts["bce"]) < 1e-6
    focal, _ = segmentation_loss(logits, target, focal_gamma=2.0)
    assert float(focal) < float(loss)  # (1 - 0.5)**2 down-weights every voxel
