"""Fixed-k, tensor-only inference post-processing for exported graphs (the rules of
:mod:`isda.modeling.postprocess`, batched and without ``Instances``).

Every image returns exactly k detections, in the order of the classification score; nothing is
thresholded by score, so the graph has no value-dependent shapes. Dropping low scores is the
caller's job.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..modeling.mask_head import MaskHead
from ..modeling.postprocess import mask_boxes, maskness, select_topk


def valid_region(image_sizes: torch.Tensor, H, W) -> torch.Tensor:
    """image_sizes (B, 2) int64 (h, w) -> (B, 1, H, W) bool, True inside each image."""
    rows = torch.arange(H, device=image_sizes.device)[None, None, :, None]
    cols = torch.arange(W, device=image_sizes.device)[None, None, None, :]
    h, w = image_sizes[:, 0, None, None, None], image_sizes[:, 1, None, None, None]
    return (rows < h) & (cols < w)


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
    scores, classes, queries = select_topk(logits, k)
    E = kernels.shape[-1]
    chosen = kernels.gather(1, queries[..., None].expand(-1, -1, E))  # (B, k, E)
    probs = MaskHead.mask_logits(chosen, mfr).sigmoid()  # (B, k, h, w)
    if use_maskness:
        scores = scores * maskness(probs, mask_threshold)
    up = F.interpolate(probs, scale_factor=stride, mode="bilinear", align_corners=False)
    masks = (up > mask_threshold) & valid_region(image_sizes, up.shape[-2], up.shape[-1])
    return scores, classes, masks, mask_boxes(masks)
