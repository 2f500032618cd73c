"""The multi-scale deformable attention module (Deformable DETR, Sec. 4.1), as used by ISDA's
encoder self-attention and decoder cross-attention."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .msda_dispatch import _autocast_dtype, ms_deform_attn


def sampling_locations(
    reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor
) -> torch.Tensor:
    """reference_points (N, Lq, L, 2) normalised (x, y), offsets (N, Lq, M, L, P, 2) in pixels of
    each level, spatial_shapes (L, 2) (H, W) -> locations (N, Lq, M, L, P, 2) normalised.

    location = reference point + offset / (W_l, H_l), element for element. Both operands are laid
    out as rows of L * P * 2 values, so that the broadcasts run along contiguous memory: broadcast
    over the size-P and size-2 axes instead, these two element-wise ops took nearly as long on CPU
    as the deformable-attention op itself (benchmarks/RESULTS.md).
    """
    P = offsets.shape[-2]
    normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(offsets.dtype)
    per_row = normalizer[:, None, :].expand(-1, P, -1).flatten()  # (L * P * 2,)
    ref_rows = reference_points[:, :, None, :, None, :].expand(-1, -1, -1, -1, P, -1).flatten(3)
    return (ref_rows + offsets.flatten(3) / per_row).view_as(offsets)


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` learned offsets around its reference point on every level.

    Args:
        d_model: token width C.
        n_levels: number of feature levels L.
        n_heads: attention heads M (C must be divisible by M).
        n_points: sampling points P per head and level.
        impl: forces one op implementation (see :func:`isda.layers.ms_deform_attn`); None = automatic.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: Optional[str] = None,
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model={d_model} is not divisible by n_heads={n_heads}"
            )
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model,
            n_levels,
            n_heads,
            n_points,
        )
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # Offsets start at zero weight with a bias that spreads each head's points along its own
        # direction ("rotating grid"), point k at distance k+1, so attention starts local and diverse.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def _offsets_and_weights(self, query: torch.Tensor):
        """query (N, Lq, C) -> offsets (N, Lq, M, L, P, 2) in pixels, weights (N, Lq, M, L, P), both
        fp32 even under autocast: a bf16 offset is off by up to 1/256 of its size, which moves a
        sampling location by a sizeable part of a pixel on the large levels."""
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if _autocast_dtype(query.device.type) is not None:
            with torch.autocast(query.device.type, enabled=False):
                return self._offsets_and_weights(query.float())
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1)
        return offsets, weights.view(N, Lq, M, L, P)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C), already carrying its positional embedding.
            reference_points: (N, Lq, L, 2) normalised (x, y) per level (valid ratios applied).
            value: (N, S, C) flattened multi-level features.
            spatial_shapes: (L, 2) int64 (H, W); level_start_index: (L,) int64.
            value_padding_mask: (N, S) bool, True on padding tokens (their value is zeroed).
        Returns:
            (N, Lq, C)
        """
        N, Lq, _ = query.shape
        M = self.n_heads
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(N, -1, M, self.d_model // M)  # (N, S, M, D)
        offsets, weights = self._offsets_and_weights(query)
        locations = sampling_locations(reference_points, offsets, spatial_shapes)
        out = ms_deform_attn(
            v, spatial_shapes, level_start_index, locations, weights, impl=self.impl
        )
        return self.output_proj(out)
