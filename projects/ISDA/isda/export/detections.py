"""Fixed-k, tensor-only inference post-processing for exported graphs (spec §6, as
:mod:`isda.modeling.postprocess`, batched and without ``Instances``).

Every image returns exactly k detections, in the order of the classification score; nothing is
thresholded by score, so the graph has no value-dependent shapes. Dropping low scores is the
caller's job.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..modeling.mask_head import dynamic_mask_logits
from ..modeling.postprocess import maskness


def topk_queries(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, Q, K) -> scores (B, k), classes (B, k), query indices (B, k), over query x class
    pairs of each image (a query may appear with several classes). Needs k <= Q * K."""
    K = logits.shape[-1]
    scores, idx = logits.sigmoid().flatten(1).topk(k, dim=1)
    return scores, idx % K, torch.div(idx, K, rounding_mode="floor")


def valid_region(image_sizes: torch.Tensor, H, W) -> torch.Tensor:
    """image_sizes (B, 2) int64 (h, w) -> (B, 1, H, W) bool, True inside each image."""
    rows = torch.arange(H, device=image_sizes.device)[None, None, :, None]
    cols = torch.arange(W, device=image_sizes.device)[None, None, None, :]
    h, w = image_sizes[:, 0, None, None, None], image_sizes[:, 1, None, None, None]
    return (rows < h) & (cols < w)


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """bool (..., H, W) -> float32 (..., 4) tight XYXY pixel boxes; an empty mask gives zeros."""
    H, W = masks.shape[-2:]
    x_any, y_any = masks.any(-2), masks.any(-1)  # (..., W), (..., H)
    xs = torch.arange(W, device=masks.device)
    ys = torch.arange(H, device=masks.device)
    x0 = torch.where(x_any, xs, W).amin(-1)
    y0 = torch.where(y_any, ys, H).amin(-1)
    x1 = torch.where(x_any, xs + 1, 0).amax(-1)
    y1 = torch.where(y_any, ys + 1, 0).amax(-1)
    boxes = torch.stack([x0, y0, x1, y1], -1).to(torch.float32)
    return boxes * x_any.any(-1, keepdim=True)


def detections_from_query_outputs(
    logits: torch.Tensor,
    kernels: torch.Tensor,
    mfr: torch.Tensor,
    image_sizes: torch.Tensor,
    stride: int,
    k: int,
    mask_threshold: float = 0.5,
    use_maskness: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Last decoder layer of a batch -> k detections per image on the padded input canvas.

    Args:
        logits: (B, Q, K); kernels: (B, Q, E); mfr: F (B, E, H/stride, W/stride).
        image_sizes: (B, 2) int64 valid (h, w) of each image in the canvas.
    Returns:
        scores (B, k) float, classes (B, k) int64, masks (B, k, H, W) bool (False outside the valid
        size), boxes (B, k, 4) float XYXY from the masks.
    """
    scores, classes, queries = topk_queries(logits, k)
    E = kernels.shape[-1]
    chosen = kernels.gather(1, queries[..., None].expand(-1, -1, E))  # (B, k, E)
    probs = dynamic_mask_logits(chosen, mfr).sigmoid()  # (B, k, h, w)
    if use_maskness:
        scores = scores * maskness(probs.flatten(0, 1), mask_threshold).view_as(scores)
    up = F.interpolate(probs, scale_factor=stride, mode="bilinear", align_corners=False)
    masks = (up > mask_threshold) & valid_region(image_sizes, up.shape[-2], up.shape[-1])
    return scores, classes, masks, boxes_from_masks(masks)
