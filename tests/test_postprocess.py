"""NMS-free inference post-processing as plain functions."""

import torch

from isda.modeling.postprocess import (
    instances_from_query_outputs,
    masks_to_boxes,
    maskness,
    paste_masks,
    select_topk,
)


def test_topk_runs_over_query_class_pairs():
    logits = torch.tensor([[5.0, 4.0, -9.0], [-9.0, -9.0, 3.0]])
    scores, classes, queries = select_topk(logits, 3)
    assert classes.tolist() == [0, 1, 2] and queries.tolist() == [0, 0, 1]  # query 0 twice
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([5.0, 4.0, 3.0])))


def test_maskness_is_mean_probability_inside_the_binary_mask():
    probs = torch.tensor([[[0.9, 0.7], [0.2, 0.1]], [[0.1, 0.2], [0.3, 0.4]]])
    m = maskness(probs, 0.5)
    torch.testing.assert_close(m, torch.tensor([0.8, 0.0]), atol=1e-4, rtol=0)


def test_paste_masks_crops_the_padding_and_resizes_to_the_output():
    probs = torch.zeros(1, 4, 4)
    probs[0, :, :2] = 1.0  # the left half of the padded 16 x 16 canvas
    # Crop the 8 x 12 image, then resize it to 16 x 24: the left two thirds stay foreground.
    out = paste_masks(probs, stride=4, image_size=(8, 12), output_size=(16, 24), threshold=0.5)
    assert out.shape == (1, 16, 24) and out.dtype == torch.bool
    assert out[0, :, :15].all() and not out[0, :, 17:].any()


def test_boxes_are_tight_around_the_masks_and_zero_for_empty_masks():
    masks = torch.zeros(2, 6, 7, dtype=torch.bool)
    masks[0, 1:4, 2:6] = True
    boxes = masks_to_boxes(masks).tensor
    assert boxes.tolist() == [[2.0, 1.0, 6.0, 4.0], [0.0, 0.0, 0.0, 0.0]]


def test_score_threshold_drops_low_scores_before_upsampling():
    logits = torch.tensor([[4.0, -4.0], [-6.0, -6.0]])
    kernels = torch.tensor([[1.0], [1.0]])
    mfr = torch.full((1, 2, 2), 5.0)
    inst = instances_from_query_outputs(
        logits, kernels, mfr, (8, 8), (8, 8), stride=4, max_per_image=4, score_threshold=0.5
    )
    assert len(inst) == 1 and inst.pred_classes.tolist() == [0]
    assert inst.pred_masks.all() and inst.pred_boxes.tensor.tolist() == [[0.0, 0.0, 8.0, 8.0]]
    everything = instances_from_query_outputs(
        logits, kernels, mfr, (8, 8), (8, 8), stride=4, max_per_image=4
    )
    assert len(everything) == 4
