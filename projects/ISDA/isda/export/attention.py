"""Multi-scale deformable attention in standard operators, for graphs recorded at one input size
and run at any other (ONNX ``GridSample``; TorchScript without the op library).

The level sizes are read by indexing ``spatial_shapes`` (never ``.tolist()``), so a tracer records
them as computations on the input's size instead of constants. The arithmetic is that of the
pure-PyTorch reference, :func:`isda.layers.ms_deform_attn_reference` (Deformable DETR, Eq. 3).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.nn.functional as F

from ..layers import MSDeformAttn

# The name through which MSDeformAttn.forward calls the functional op.
_OP_NAME = "ms_deform_attn"


def ms_deform_attn_traceable(  # the arguments of isda.layers.ms_deform_attn
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl=None
) -> torch.Tensor:
    """The tensor contract of :func:`isda.layers.ms_deform_attn` (``impl`` is ignored):
    value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,),
    sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D).
    """
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1  # grid_sample reads [-1, 1]
    sampled = []
    for lvl in range(L):
        h, w = spatial_shapes[lvl, 0], spatial_shapes[lvl, 1]
        start = level_start_index[lvl]
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value.narrow(1, start, h * w).flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (N*M, D, Lq, P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2)


@contextlib.contextmanager
def traceable_attention() -> Iterator[None]:
    """Within the block, every :class:`MSDeformAttn` computes through
    :func:`ms_deform_attn_traceable`, whatever its ``impl``; the previous op is restored on exit."""
    module = inspect.getmodule(MSDeformAttn)
    original = getattr(module, _OP_NAME, None)
    if original is None:
        raise RuntimeError(
            f"{module.__name__} no longer calls `{_OP_NAME}`: the export cannot route the "
            "deformable attention through standard operators"
        )
    setattr(module, _OP_NAME, ms_deform_attn_traceable)
    try:
        yield
    finally:
        setattr(module, _OP_NAME, original)
