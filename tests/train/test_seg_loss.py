import torch

from train.seg_loss import adaptive_tversky_loss, segmentation_loss


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
