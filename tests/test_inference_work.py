"""Inference shortcuts give the results of the straightforward computation, within float rounding."""

import pytest
import torch
from detectron2.layers import ShapeSpec

from isda.modeling.mask_feature_head import MaskFeatureHead, coord_channels

NECK = {f"p{i}": ShapeSpec(channels=32, stride=2**i) for i in range(2, 7)}


def _pyramid(h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(2, 32, h // s.stride, w // s.stride, generator=g)
        for name, s in NECK.items()
    }


@pytest.mark.parametrize(
    "stride, levels", [(4, ["p2", "p3", "p4", "p5"]), (8, ["p3", "p4", "p5"]), (2, ["p2", "p3"])]
)
def test_mfr_head_sums_branches_before_their_shared_upsampling(stride, levels):
    torch.manual_seed(0)
    head = MaskFeatureHead(NECK, levels, stride=stride, inner_dim=32, out_dim=32).eval()
    for p in head.parameters():  # away from the near-zero init, so every branch matters
        torch.nn.init.normal_(p, std=0.3)
    feats = _pyramid()
    with torch.no_grad():
        out = head(feats)
        # The definition: every branch brought to the fusion stride on its own, then summed.
        branch_sum = 0
        for i, (name, branch) in enumerate(zip(head.in_features, head.branches)):
            x = feats[name]
            if i == len(head.branches) - 1:
                x = torch.cat([x, coord_channels(x)], 1)
            branch_sum = branch_sum + branch(x)
        if head.refine is not None:
            branch_sum = head.refine(branch_sum)
        expected = head.conv_pred(branch_sum)
    assert out.shape == (2, 32, 64 // stride, 96 // stride)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
