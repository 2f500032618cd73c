"""Channel-mapper neck (paper Fig. 2, "neck"): backbone C2..C5 -> P2..P6, all at HIDDEN_DIM channels.

P2..P5 are 1x1 conv + GroupNorm of C2..C5; P6 is a 3x3 stride-2 conv + GroupNorm of **C5**
(released code: mmdet/models/necks/isda_channel_mapper.py, ISDAChannelMapper).
No activations. P3..P6 feed the deformable transformer, P2..P5 the mask feature head.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn

GN_GROUPS = 32
# Output names and their strides for a backbone whose C2..C5 have strides 4..32 (every ResNet).
LEVEL_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def _conv_gn(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> Conv2d:
    conv = Conv2d(
        in_ch,
        out_ch,
        kernel_size=kernel,
        stride=stride,
        padding=kernel // 2,
        bias=False,  # GroupNorm follows
        norm=get_norm("GN", out_ch) if out_ch % GN_GROUPS == 0 else nn.GroupNorm(1, out_ch),
    )
    nn.init.xavier_uniform_(conv.weight)
    return conv


class ChannelMapper(nn.Module):
    """Maps the backbone outputs to a pyramid of equal width.

    Input: dict of backbone features ``{in_features[i]: (B, C_i, H/2^(i+2), W/2^(i+2))}``.
    Output: dict ``{"p2": (B, C, H/4, W/4), ..., "p5": (B, C, H/32, W/32)[, "p6": (B, C, ceil(H/64), ..)]}``.
    """

    def __init__(
        self, input_shapes: Dict[str, ShapeSpec], in_features: List[str], dim: int, with_p6: bool
    ):
        super().__init__()
        if len(in_features) != 4:
            raise ValueError(
                f"ChannelMapper: in_features must name 4 backbone outputs (C2..C5), got {in_features}"
            )
        self.in_features = list(in_features)
        # Channel counts come from the backbone, so R18/R34 (64..512) work as well as R50 (256..2048).
        self.lateral = nn.ModuleList(
            [_conv_gn(input_shapes[f].channels, dim, kernel=1) for f in self.in_features]
        )
        self.p6 = (
            _conv_gn(input_shapes[self.in_features[-1]].channels, dim, 3, 2) if with_p6 else None
        )
        self._out_names = list(LEVEL_STRIDES)[: 5 if with_p6 else 4]
        strides = [input_shapes[f].stride for f in self.in_features]
        self._strides = dict(zip(self._out_names, strides + ([strides[-1] * 2] if with_p6 else [])))
        self.dim = dim

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self.dim, stride=s) for n, s in self._strides.items()}

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        c = [features[f] for f in self.in_features]
        out = {name: conv(x) for name, conv, x in zip(self._out_names, self.lateral, c)}
        if self.p6 is not None:
            out["p6"] = self.p6(c[-1])
        return out
