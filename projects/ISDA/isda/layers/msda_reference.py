"""The pure-PyTorch implementation of multi-scale deformable attention (``impl="reference"``): the
ground truth that every native kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention through ``grid_sample`` (contract: :mod:`.msda_dispatch`).

    The level sizes are read by indexing ``spatial_shapes`` (never ``.tolist()``), so a graph
    recorded at one input size (``torch.jit.trace``, ONNX export) takes them from that input's
    feature maps and stays right at every other size.

    Args:
        value: (N, S, M, D); spatial_shapes: (L, 2) int64 (H, W); level_start_index: (L,) int64
            offset of each level in S;
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y); attention_weights:
            (N, Lq, M, L, P).
    Returns:
        (N, Lq, M * D)
    """
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    # grid_sample wants coordinates in [-1, 1].
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl in range(L):
        h, w = spatial_shapes[lvl, 0], spatial_shapes[lvl, 1]
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value.narrow(1, level_start_index[lvl], h * w)
        v = v.flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # (N*M, D, Lq, P)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()
