"""Mask feature representation (MFR) head (paper Fig. 3; SOLOv2-style; released code:
mmdet/models/roi_heads/mask_heads/mask_feat_head.py, MaskFeatHead).

Every input level goes through 3x3 conv-GN-ReLU blocks (CGR) and x2 bilinear upsamplings until it reaches
the fusion stride, the branches are summed, and a 1x1 CGR maps them to the MFR F.

* stride 4 (default): P2: CGR | P3: CGR, up | P4: (CGR, up) x2 | P5 (+2 coord ch.): (CGR, up) x3
* stride 8: the same rule with P3..P5 fused at 1/8 (``in_features`` should then be p3..p5)
* stride 2: the stride-4 fusion, then one more CGR + x2 upsampling

The released code builds stride 4 only; strides 8 and 2 (paper Table 1) are this module's own
construction, as the paper does not describe them.

MP (``coord``): "p5_input" appends [x, y] in [-1, 1] to the coarsest input (released code), "none"
appends nothing, "output" appends them to F itself (F then has ``out_dim + 2`` channels).
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn

STRIDES = (2, 4, 8)  # strides of F this head can build (paper Table 1)
COORD_MODES = ("p5_input", "none", "output")  # where the coordinate channels enter (MP)
COORD_CHANNELS = 2


def fusion_stride(stride: int) -> int:
    """Stride at which the input branches are summed for an MFR of ``stride``: 4 for strides 4 and
    2 (stride 2 then refines once more), 8 for stride 8. The finest input level must have it."""
    return max(stride, 4)


def _unit_range(n: int, like: torch.Tensor) -> torch.Tensor:
    """(n,) evenly spaced from -1 to 1, as ``torch.linspace(-1, 1, n)`` within float rounding (one
    point: -1). Built from ``arange`` so that a recorded graph (trace, torch.export) keeps n
    symbolic; ``linspace`` takes its length as a constant."""
    index = torch.arange(n, device=like.device, dtype=like.dtype)
    last = index[-1:].clamp(min=1)  # n - 1, as a tensor
    return (2 * index - last) / last


def coord_channels(like: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2, H, W): x then y, each evenly spaced in [-1, 1] over the (padded) map."""
    B, _, H, W = like.shape
    yy, xx = torch.meshgrid(_unit_range(H, like), _unit_range(W, like), indexing="ij")
    return torch.stack([xx, yy])[None].expand(B, -1, -1, -1)


def _cgr(in_ch: int, out_ch: int, kernel: int = 3) -> Conv2d:
    conv = Conv2d(
        in_ch,
        out_ch,
        kernel,
        padding=kernel // 2,
        bias=False,
        norm=get_norm("GN", out_ch),
        activation=F.relu,
    )
    nn.init.normal_(conv.weight, std=0.01)
    return conv


class _Up2(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class MaskFeatureHead(nn.Module):
    """Input: dict of neck maps (B, C, H/s, W/s); output F: (B, out_channels, H/stride, W/stride)."""

    def __init__(
        self,
        input_shapes: Dict[str, ShapeSpec],
        in_features: List[str],
        stride: int = 4,
        inner_dim: int = 128,
        out_dim: int = 256,
        coord: str = "p5_input",
    ):
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"MaskFeatureHead: stride must be one of {STRIDES}, got {stride!r}")
        if coord not in COORD_MODES:
            raise ValueError(f"MaskFeatureHead: coord must be one of {COORD_MODES}, got {coord!r}")
        self.in_features = sorted(in_features, key=lambda f: input_shapes[f].stride)
        self.fuse_stride = fusion_stride(stride)
        finest = min(input_shapes[f].stride for f in self.in_features)
        if finest != self.fuse_stride:
            raise ValueError(
                f"MaskFeatureHead: stride={stride} fuses at stride {self.fuse_stride}, so the finest "
                f"of in_features must have that stride; {list(in_features)} has {finest}"
            )
        self.coord, self.stride = coord, stride
        self.branches = nn.ModuleList(
            [
                self._branch(input_shapes[f], i == len(self.in_features) - 1, inner_dim)
                for i, f in enumerate(self.in_features)
            ]
        )
        # Stride 2: one extra CGR + upsampling after the stride-4 fusion (see the module docstring).
        self.refine = (
            nn.Sequential(_cgr(inner_dim, inner_dim), _Up2()) if stride < self.fuse_stride else None
        )
        self.conv_pred = _cgr(inner_dim, out_dim, kernel=1)
        self.out_channels = out_dim + (COORD_CHANNELS if coord == "output" else 0)

    def _branch(self, shape: ShapeSpec, coarsest: bool, inner_dim: int) -> nn.Sequential:
        n_up = int(math.log2(shape.stride // self.fuse_stride))
        in_ch = shape.channels + (COORD_CHANNELS if coarsest and self.coord == "p5_input" else 0)
        layers: List[nn.Module] = []
        for i in range(max(n_up, 1)):
            layers.append(_cgr(in_ch if i == 0 else inner_dim, inner_dim))
            if i < n_up:
                layers.append(_Up2())
        return nn.Sequential(*layers)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        # Bilinear upsampling is linear, so the branches that end in one are summed first and
        # upsampled once (one resize of 128 channels to the fusion stride instead of three).
        fused, coarse = None, None
        for i, (name, branch) in enumerate(zip(self.in_features, self.branches)):
            x = features[name]
            if i == len(self.branches) - 1 and self.coord == "p5_input":
                x = torch.cat([x, coord_channels(x)], 1)
            if isinstance(branch[-1], _Up2):
                # Layer by layer rather than branch[:-1](x): a sliced Sequential is a new module
                # per call, which graph exporters record under an unloadable module path.
                y = x
                for layer in list(branch)[:-1]:
                    y = layer(y)
                coarse = y if coarse is None else coarse + y
            else:
                y = branch(x)
                fused = y if fused is None else fused + y
        if coarse is not None:
            fused = fused + _Up2()(coarse)
        if self.refine is not None:
            fused = self.refine(fused)
        out = self.conv_pred(fused)
        if self.coord == "output":
            out = torch.cat([out, coord_channels(out)], 1)
        return out
