"""The ResNet backbone (paper Fig. 2, "Backbone"), registered as ``build_isda_resnet_backbone``.

Detectron2's ``build_resnet_backbone`` with one difference: the basic-block ResNets (R18, R34) may
have any width, set by MODEL.RESNETS.RES2_OUT_CHANNELS (res3..res5 double it stage by stage) and
MODEL.RESNETS.STEM_OUT_CHANNELS. Detectron2 fixes them at 64, the ImageNet models' width; a model
trained from scratch on a small problem, like the CPU demo, learns about as much per iteration at
half the width, with a quarter of the multiply-adds in res2..res5 (README, "The demo"). Bottleneck
ResNets (R50 and deeper) are built by Detectron2's builder itself.
"""

from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import (
    BasicBlock,
    BasicStem,
    ResNet,
    build_resnet_backbone,
)

# Residual blocks per stage (res2..res5) of the basic-block ResNets.
BASIC_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


@BACKBONE_REGISTRY.register()
def build_isda_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """A Detectron2 ResNet from MODEL.RESNETS.*, of any width when DEPTH is 18 or 34."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in BASIC_BLOCKS_PER_STAGE:
        return build_resnet_backbone(cfg, input_shape)
    _check_basic_block_keys(r)
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages, in_channels, out_channels = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for idx, num_blocks in enumerate(BASIC_BLOCKS_PER_STAGE[r.DEPTH]):
        first_stride = 1 if idx == 0 else 2  # res2 follows the stem's max-pool at stride 4
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=r.NORM,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def _check_basic_block_keys(r) -> None:
    """Bottleneck-only options have no meaning for basic blocks: refuse them by key."""
    depth = r.DEPTH
    for key, ok in (
        ("DEFORM_ON_PER_STAGE", not any(r.DEFORM_ON_PER_STAGE)),
        ("RES5_DILATION", r.RES5_DILATION == 1),
        ("NUM_GROUPS", r.NUM_GROUPS == 1),
    ):
        if not ok:
            raise ValueError(
                f"MODEL.RESNETS.{key}={r.get(key)!r} is not supported by the basic-block "
                f"R{depth}; it needs bottleneck blocks (MODEL.RESNETS.DEPTH >= 50)"
            )
    for key in ("RES2_OUT_CHANNELS", "STEM_OUT_CHANNELS"):
        if r.get(key) < 1:
            raise ValueError(f"MODEL.RESNETS.{key}={r.get(key)} must be >= 1")
