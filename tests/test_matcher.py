"""Hungarian matching: focal class cost + soft mask-IoU cost, robust to NaN/Inf."""

import math

import torch

from isda.modeling.matcher import HungarianMatcher, focal_class_cost, soft_iou_cost

BIG = 20.0


def _perfect_prediction(Q=6, K=3):
    gt = torch.zeros(2, 4, 4)
    gt[0, :2, :2] = 1
    gt[1, 2:, 1:] = 1
    labels = torch.tensor([2, 0])
    logits = torch.full((1, Q, K), -BIG)
    mask_logits = torch.full((1, Q, 4, 4), -BIG)
    # GT 0 is predicted by query 4, GT 1 by query 1.
    for q, g in ((4, 0), (1, 1)):
        logits[0, q, labels[g]] = BIG
        mask_logits[0, q] = gt[g] * 2 * BIG - BIG
    return logits, mask_logits, [{"labels": labels, "masks": gt}]


def test_perfect_prediction_is_matched_to_its_ground_truth():
    logits, mask_logits, targets = _perfect_prediction()
    ((q, g),) = HungarianMatcher()(logits, mask_logits, targets)
    assert dict(zip(g.tolist(), q.tolist())) == {0: 4, 1: 1}


def test_nan_and_inf_predictions_do_not_crash_the_assignment():
    logits, mask_logits, targets = _perfect_prediction()
    logits[0, 0] = float("nan")
    logits[0, 2] = float("inf")
    mask_logits[0, 3] = float("nan")
    ((q, g),) = HungarianMatcher()(logits, mask_logits, targets)
    assert len(q) == len(g) == 2
    # The healthy, perfect queries still win.
    assert dict(zip(g.tolist(), q.tolist())) == {0: 4, 1: 1}
    all_nan = torch.full_like(logits, float("nan"))
    ((q, g),) = HungarianMatcher()(all_nan, torch.full_like(mask_logits, float("nan")), targets)
    assert len(q) == 2


def test_image_without_ground_truth_matches_nothing():
    logits, mask_logits, _ = _perfect_prediction()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 4)}]
    ((q, g),) = HungarianMatcher()(logits, mask_logits, empty)
    assert q.numel() == 0 and g.numel() == 0


def test_focal_cost_matches_hand_computation():
    p = 0.7
    logit = math.log(p / (1 - p))
    cost = focal_class_cost(torch.tensor([[logit, 0.0]]), torch.tensor([0]), alpha=0.25, gamma=2.0)
    pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-12)
    neg = 0.75 * p**2 * -math.log(1 - p + 1e-12)
    assert math.isclose(cost.item(), pos - neg, rel_tol=1e-5)


def test_soft_iou_cost_matches_hand_computation():
    probs = torch.tensor([[0.5, 0.5, 0.0]])
    gt = torch.tensor([[1.0, 0.0, 0.0]])
    # I = 0.5, U = 1 + 1 - 0.5 = 1.5
    assert math.isclose(soft_iou_cost(probs, gt).item(), 1 - 0.5 / (1.5 + 1e-6), rel_tol=1e-6)
