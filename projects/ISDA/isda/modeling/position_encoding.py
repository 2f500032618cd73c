"""Sine positional encoding of a feature map (DETR), with the mmdet offset of -0.5 (released code:
mmdet/models/utils/positional_encoding.py, SinePositionalEncoding)."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinePositionalEncoding(nn.Module):
    """Encodes each un-padded pixel by its normalised (y, x) position.

    ``forward(mask)``: mask (B, H, W) bool, True on padding -> (B, 2 * num_feats, H, W), y first.
    Channel 2k of each half is sin, 2k+1 is cos, with frequency temperature^(2*floor(k/2)/num_feats).
    """

    def __init__(self, num_feats: int = 128, temperature: float = 10000.0, offset: float = -0.5):
        super().__init__()
        self.num_feats, self.temperature, self.offset = num_feats, temperature, offset
        self.scale, self.eps = 2 * math.pi, 1e-6

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = (~mask).to(torch.float32)
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        # Normalise by the valid extent of each column/row, so padding does not shift the code.
        y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
        x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        k = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_feats)
        pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t  # (B, H, W, F)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
