"""Multi-scale deformable attention: the functional op and its implementations.

Tensor contract (shared by every implementation)::

    value               (N, S, M, D)           float; S = sum_l H_l * W_l
    spatial_shapes      (L, 2)   int64          (H_l, W_l) of each level
    level_start_index   (L,)     int64          offset of level l in S
    sampling_locations  (N, Lq, M, L, P, 2)    normalised (x, y); [0, 1] covers the map
    attention_weights   (N, Lq, M, L, P)       float
    -> output           (N, Lq, M * D)

Each sample is bilinear with zero padding outside the map and ``align_corners=False`` semantics
(identical to ``torch.nn.functional.grid_sample``): location (x, y) reads pixel coordinate
(x * W_l - 0.5, y * H_l - 0.5).

``impl`` chooses the implementation: ``None`` (automatic), ``"reference"``, ``"cpu"`` or ``"cuda"``.
The environment variable ``ISDA_MSDA_IMPL`` sets the same choice process-wide.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "IMPLS"]

IMPLS = ("reference", "cpu", "cuda")


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch implementation through ``grid_sample`` (the ground truth for every kernel)."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1].
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_per_level[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
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


def _resolve_impl(impl: Optional[str], device: torch.device) -> str:
    choice = impl or os.environ.get("ISDA_MSDA_IMPL") or None
    if choice is not None and choice not in IMPLS:
        raise ValueError(
            f"ms_deform_attn: impl={choice!r} is not one of {IMPLS} "
            "(argument `impl` or environment variable ISDA_MSDA_IMPL)"
        )
    return choice or "reference"


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Multi-scale deformable attention (Zhu et al., Deformable DETR, Eq. 3). See module docstring."""
    choice = _resolve_impl(impl, value.device)
    if choice != "reference":
        raise RuntimeError(
            f"ms_deform_attn: impl={choice!r} requested but isda._C is not available in this build"
        )
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
