"""The backbone builder: Detectron2's ResNet, of any width for the basic-block depths."""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.structures import BitMasks, Instances

from conftest import tiny_cfg
from isda.modeling.backbone import build_isda_resnet_backbone

ISDA_BACKBONE = ["MODEL.BACKBONE.NAME", "build_isda_resnet_backbone"]


def _seeded(builder, cfg):
    torch.manual_seed(0)
    return builder(cfg, ShapeSpec(channels=3))


@pytest.mark.parametrize("depth", [18, 50])
def test_at_detectron2_widths_it_is_detectron2s_resnet(depth):
    """Same modules, parameter names, initial weights and features as build_resnet_backbone."""
    opts = ["MODEL.RESNETS.DEPTH", depth]
    if depth == 50:
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", 256]
    cfg = tiny_cfg(*opts)
    ours, theirs = _seeded(build_isda_resnet_backbone, cfg), _seeded(build_resnet_backbone, cfg)
    assert str(ours) == str(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, 64, 96)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        fa, fb = ours(x), theirs(x)
    assert all(torch.equal(fa[k], fb[k]) for k in fb)


def test_narrow_basic_block_resnet_keeps_strides_and_doubles_width():
    cfg = tiny_cfg(
        *ISDA_BACKBONE, "MODEL.RESNETS.RES2_OUT_CHANNELS", 24, "MODEL.RESNETS.STEM_OUT_CHANNELS", 16
    )
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    assert [(shapes[f"res{i}"].channels, shapes[f"res{i}"].stride) for i in (2, 3, 4, 5)] == [
        (24, 4),
        (48, 8),
        (96, 16),
        (192, 32),
    ]
    feats = backbone(torch.randn(2, 3, 64, 96))
    assert feats["res5"].shape == (2, 192, 2, 3) and feats["res2"].shape == (2, 24, 16, 24)
    # Detectron2's own builder refuses this width, which is why the builder exists.
    with pytest.raises(AssertionError, match="RES2_OUT_CHANNELS"):
        build_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_isda_trains_a_step_on_a_narrow_backbone():
    cfg = tiny_cfg(
        *ISDA_BACKBONE, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32, "MODEL.RESNETS.STEM_OUT_CHANNELS", 32
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.backbone.output_shape()["res5"].channels == 256
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    gt = Instances((64, 96))
    masks = torch.zeros(1, 64, 96, dtype=torch.bool)
    masks[0, 10:40, 20:60] = True
    gt.gt_masks, gt.gt_classes = BitMasks(masks), torch.tensor([1])
    gt.gt_boxes = BitMasks(masks).get_bounding_boxes()
    losses = model([{"image": image, "height": 64, "width": 96, "instances": gt}])
    sum(losses.values()).backward()
    stem_grad = model.backbone.stem.conv1.weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0


@pytest.mark.parametrize(
    "key,value", [("NUM_GROUPS", 2), ("RES5_DILATION", 2), ("RES2_OUT_CHANNELS", 0)]
)
def test_options_basic_blocks_cannot_take_are_refused_by_key(key, value):
    cfg = tiny_cfg(*ISDA_BACKBONE, f"MODEL.RESNETS.{key}", value)
    with pytest.raises(ValueError, match=f"MODEL.RESNETS.{key}"):
        build_backbone(cfg)
