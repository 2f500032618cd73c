"""Set criterion: hand-computed losses on tiny tensors, target preparation, and gradient paths."""

import math

import torch
from fvcore.nn import sigmoid_focal_loss

from isda.modeling.criterion import (
    SetCriterion,
    dice_loss,
    downsample_gt_masks,
    soft_iou_loss,
)
from isda.modeling.mask_head import MaskHead
from isda.modeling.matcher import HungarianMatcher


def test_dice_loss_is_the_squared_vnet_form():
    probs, gt = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    # 2 * 0.5 / (0.25 + 0.25 + 0.001 + 1 + 0.001)
    assert math.isclose(dice_loss(probs, gt).item(), 1 - 1.0 / 1.502, rel_tol=1e-6)


def test_iou_loss_is_one_minus_soft_iou():
    probs, gt = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    assert math.isclose(soft_iou_loss(probs, gt).item(), 1 - 0.5 / 1.5, rel_tol=1e-5)


def test_bilinear_gt_downsampling_averages_the_centre_pixels():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :, 2] = True  # a vertical line in column 2
    out = downsample_gt_masks(mask, (12, 8), stride=4, mode="bilinear")
    assert out.shape == (1, 3, 2)  # zero-padded to the batch canvas first
    # Output column 0 samples input x = 1.5: half of column 1 (0) and half of column 2 (1).
    torch.testing.assert_close(out[0, :2, 0], torch.tensor([0.5, 0.5]))
    assert out[0, 2].abs().sum() == 0 and out[0, :, 1].abs().sum() == 0
    nearest = downsample_gt_masks(mask, (8, 8), stride=4, mode="nearest")
    assert set(nearest.unique().tolist()) <= {0.0, 1.0}


def hand_case():
    """One layer, one image, two queries, two classes, two MFR channels over a 1 x 2 map:
    -> logits (D=1, B=1, Q=2, K=2), kernels (1, 1, 2, E=2), mfr (B=1, E=2, 1, 2), targets."""
    logits = torch.tensor([[[[2.0, -1.0], [-3.0, 0.5]]]])
    kernels = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    mfr = torch.tensor([[[[3.0, -3.0]], [[-3.0, 3.0]]]])
    targets = [{"labels": torch.tensor([0]), "masks": torch.tensor([[[1.0, 0.0]]])}]
    return logits, kernels, mfr, targets


def test_criterion_matches_a_hand_computation():
    logits, kernels, mfr, targets = hand_case()
    crit = SetCriterion(HungarianMatcher(), num_classes=2, class_weight=2.0, mask_weight=3.0)
    losses = crit(logits, kernels, mfr, targets)
    # Query 0 predicts class 0 and mask [sigmoid(3), sigmoid(-3)]: it must be the match.
    onehot = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    focal = sigmoid_focal_loss(logits[0], onehot, 0.25, 2.0, reduction="sum")
    p = torch.sigmoid(torch.tensor([3.0, -3.0]))
    t = torch.tensor([1.0, 0.0])
    dice = 1 - 2 * (p * t).sum() / ((p * p).sum() + 0.001 + (t * t).sum() + 0.001)
    assert math.isclose(losses["loss_cls"].item(), 2.0 * focal.item(), rel_tol=1e-5)
    assert math.isclose(losses["loss_mask"].item(), 3.0 * dice.item(), rel_tol=1e-5)


def test_deep_supervision_names_one_loss_pair_per_layer():
    D, B, Q, K, E = 3, 2, 4, 3, 2
    logits, kernels = torch.randn(D, B, Q, K), torch.randn(D, B, Q, E)
    mfr = torch.randn(B, E, 4, 4)
    targets = [
        {"labels": torch.tensor([1]), "masks": torch.rand(1, 4, 4)},
        {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 4)},
    ]
    losses = SetCriterion(HungarianMatcher(), K)(logits, kernels, mfr, targets)
    assert set(losses) == {
        "loss_cls",
        "loss_mask",
        "loss_cls_0",
        "loss_mask_0",
        "loss_cls_1",
        "loss_mask_1",
    }
    assert all(torch.isfinite(v) for v in losses.values())
    last_only = SetCriterion(HungarianMatcher(), K, deep_supervision=False)(
        logits, kernels, mfr, targets
    )
    assert set(last_only) == {"loss_cls", "loss_mask"}
    torch.testing.assert_close(last_only["loss_mask"], losses["loss_mask"])


def test_batch_without_ground_truth_gives_finite_losses_and_gradients():
    kernels = torch.randn(1, 1, 4, 2, requires_grad=True)
    logits = torch.randn(1, 1, 4, 3, requires_grad=True)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 4)}]
    losses = SetCriterion(HungarianMatcher(), 3)(logits, kernels, torch.randn(1, 2, 4, 4), empty)
    sum(losses.values()).backward()
    assert losses["loss_mask"].item() == 0 and torch.isfinite(logits.grad).all()


def test_mask_loss_gradient_on_f_sums_every_layer_and_image():
    """F's gradient from the losses of 3 layers x 2 images equals that of each matched mask's dice
    computed on its own image's F, summed (the criterion shares one view of F per image)."""
    torch.manual_seed(0)
    D, B, Q, K, E = 3, 2, 4, 3, 5
    logits, kernels = torch.randn(D, B, Q, K), torch.randn(D, B, Q, E)
    mfr = torch.randn(B, E, 6, 7, requires_grad=True)
    targets = [
        {"labels": torch.tensor([1, 0]), "masks": torch.rand(2, 6, 7)},
        {"labels": torch.tensor([2]), "masks": torch.rand(1, 6, 7)},
    ]
    crit = SetCriterion(HungarianMatcher(), K, class_weight=0.0, mask_weight=1.0)
    sum(crit(logits, kernels, mfr, targets).values()).backward()
    ref_mfr = mfr.detach().clone().requires_grad_()
    total = 0.0
    for i in range(D):
        masks = MaskHead.mask_logits(kernels[i], ref_mfr.detach())
        for b, (q, g) in enumerate(crit.matcher(logits[i], masks, targets)):
            pred = MaskHead.mask_logits(kernels[i, b, q], ref_mfr[b]).flatten(1).sigmoid()
            total = total + dice_loss(pred, targets[b]["masks"][g].flatten(1)).sum() / 3.0
    total.backward()
    assert mfr.grad.abs().sum() > 0
    torch.testing.assert_close(mfr.grad, ref_mfr.grad, rtol=1e-5, atol=1e-6)


def _mask_loss_grad_on_reference(kernel_ref: bool, detach: bool):
    head = MaskHead(
        dim=8, num_classes=2, kernel_dim=6, num_layers=1, kernel_ref=kernel_ref, ref_detach=detach
    )
    ref = torch.full((1, 3, 2), 0.3, requires_grad=True)
    _, kernels = head(torch.randn(1, 1, 3, 8), ref)
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.rand(2, 5, 5)}]
    crit = SetCriterion(HungarianMatcher(), 2)
    loss = crit(torch.randn(1, 1, 3, 2), kernels, torch.randn(1, 6, 5, 5), targets)["loss_mask"]
    loss.backward()
    return ref.grad


def test_with_kp_the_mask_loss_reaches_the_reference_points():
    grad = _mask_loss_grad_on_reference(kernel_ref=True, detach=False)
    assert grad is not None and grad.abs().sum() > 0
    assert _mask_loss_grad_on_reference(kernel_ref=True, detach=True) is None
    assert _mask_loss_grad_on_reference(kernel_ref=False, detach=False) is None


def test_mask_bce_term_is_the_mean_pixel_bce_of_the_matched_mask():
    logits, kernels, mfr, targets = hand_case()  # with MODEL.ISDA.MASK_BCE_WEIGHT > 0 below
    without = SetCriterion(HungarianMatcher(), num_classes=2)(logits, kernels, mfr, targets)
    crit = SetCriterion(HungarianMatcher(), num_classes=2, bce_weight=5.0)
    losses = crit(logits, kernels, mfr, targets)
    # Query 0's mask logits are (3, -3) against the target (1, 0): -log(sigmoid(3)) per pixel.
    assert math.isclose(
        losses["loss_mask_bce"].item(), 5.0 * math.log1p(math.exp(-3.0)), rel_tol=1e-5
    )
    assert "loss_mask_bce" not in without  # weight 0 (the released recipe): no term at all
    assert losses["loss_mask"].item() == without["loss_mask"].item()
