"""NMS-free inference post-processing as plain functions."""

import pytest
import torch
import torch.nn.functional as F

from isda.modeling import postprocess
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


def _blob_probs(n, H, W, seed=0):
    """n (H, W) probability maps of noisy discs of random centre and radius; the first three are
    replaced by a map that passes nowhere, one that passes everywhere and one that passes only in
    its bottom-right pixel (in the padding for the smaller images)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    cy, cx = torch.rand(n, 1, 1, generator=g) * H, torch.rand(n, 1, 1, generator=g) * W
    radius = 1 + torch.rand(n, 1, 1, generator=g) * H / 6
    dist = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
    probs = (radius - dist + 0.3 * torch.randn(n, H, W, generator=g)).sigmoid()
    probs[0], probs[1] = 0.1, 0.9
    probs[2] = 0.1
    probs[2, -1, -1] = 0.9
    return probs


def _upsampled(probs, stride, image_size, output_size):
    """The probabilities that paste_masks thresholds, computed over the whole image."""
    h, w = image_size
    m = F.interpolate(probs[None], scale_factor=stride, mode="bilinear")[:, :, :h, :w]
    return F.interpolate(m, size=output_size, mode="bilinear")[0]


@pytest.mark.parametrize(
    "image_size,output_size",
    [
        ((93, 118), (93, 118)),
        ((93, 118), (240, 320)),
        ((93, 118), (61, 77)),
        ((96, 128), (97, 127)),
    ],
)
def test_windowed_paste_equals_upsampling_every_mask_whole(image_size, output_size):
    """Computing each mask only where it can pass the threshold changes no pixel: bit for bit at the
    model's input size, and at another output size at most where a probability is a float
    rounding away from the threshold."""
    probs = _blob_probs(24, 24, 32)
    windowed = postprocess._paste_windowed(probs, 4, image_size, output_size, 0.5)
    whole = postprocess._paste_whole(probs, 4, image_size, output_size, 0.5)
    assert windowed.shape == whole.shape == (24, *output_size)
    differ = windowed != whole
    if output_size == image_size:
        assert not differ.any()
    else:
        near = (_upsampled(probs, 4, image_size, output_size) - 0.5).abs() < 1e-5
        assert not (differ & ~near).any()
    assert whole[3:].any() and not whole[0].any() and whole[1].all()


def test_windowed_paste_skips_the_image_outside_each_masks_reach(monkeypatch):
    """A small mask is upsampled only around itself: the interpolation never sees a map larger than
    its window, and a mask that covers most of the image goes through the whole-image path."""
    probs = torch.full((2, 40, 40), 0.1)
    probs[0, 10:13, 20:22] = 0.9  # 3 x 2 low-resolution pixels
    probs[1, 2:38, 2:38] = 0.9
    sizes, whole_calls = [], []
    interpolate, paste_whole = F.interpolate, postprocess._paste_whole

    def spy_interpolate(x, *args, **kwargs):
        sizes.append(tuple(x.shape))
        return interpolate(x, *args, **kwargs)

    def spy_whole(p, *args):
        whole_calls.append(p.shape[0])
        return paste_whole(p, *args)

    monkeypatch.setattr(postprocess.F, "interpolate", spy_interpolate)
    monkeypatch.setattr(postprocess, "_paste_whole", spy_whole)
    out = postprocess.paste_masks(probs, 4, (160, 160), (160, 160), 0.5)
    assert sizes[0][-2:] == (
        3 + 2 + 4,
        2 + 2 + 4,
    )  # the mask, its reach (1, 2) and the margin (2, 2)
    assert whole_calls == [1]
    monkeypatch.undo()
    assert torch.equal(out, postprocess._paste_whole(probs, 4, (160, 160), (160, 160), 0.5))
