"""NMS-free inference (released code: mmdet/models/dense_heads/isda_head.py, ISDAHead.get_masks and
_get_masks_single): top-k over query x class scores, maskness rescoring, mask upsampling.

Pure functions, testable alone. Differences from the released code: any batch size, an optional score
threshold (applied before the expensive upsampling), and boxes derived from the masks.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from ..layers.recording import recording_graph
from .mask_head import MaskHead

MASKNESS_EPS = 1e-5
# Upsampling is done in chunks of masks, so 100 float masks of a large image never coexist in memory.
UPSAMPLE_CHUNK = 16


def select_topk(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (..., Q, K) -> scores, classes, query indices, each (..., min(k, Q*K)), over the
    query x class pairs of each image: one query may appear with several classes."""
    Q, K = logits.shape[-2:]
    scores, idx = logits.sigmoid().flatten(-2).topk(min(k, Q * K), dim=-1)
    return scores, idx % K, torch.div(idx, K, rounding_mode="floor")


def maskness(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """probs (..., h, w) -> (...): mean probability inside the binary mask (0 for an empty mask)."""
    binary = (probs > threshold).to(probs.dtype)
    return (probs * binary).flatten(-2).sum(-1) / (binary.flatten(-2).sum(-1) + MASKNESS_EPS)


def _any(masks: torch.Tensor, dim: int) -> torch.Tensor:
    """bool ``masks.any(dim)``. In eager mode, amax over a uint8 view is several times faster on
    CPU and identical; graph recorders (tracing, ONNX) do not support the dtype view, so they get
    the plain reduction."""
    if recording_graph():
        return masks.any(dim)
    return masks.view(torch.uint8).amax(dim) > 0


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """bool (..., H, W) -> float32 (..., 4) tight XYXY pixel boxes; an empty mask gives zeros.

    Vectorised: Detectron2's BitMasks.get_bounding_boxes loops per mask and always returns CPU boxes.
    """
    H, W = masks.shape[-2:]
    x_any, y_any = _any(masks, -2), _any(masks, -1)  # (..., W), (..., H)
    xs = torch.arange(W, device=masks.device)
    ys = torch.arange(H, device=masks.device)
    x0 = torch.where(x_any, xs, W).amin(-1)
    y0 = torch.where(y_any, ys, H).amin(-1)
    x1 = torch.where(x_any, xs + 1, 0).amax(-1)
    y1 = torch.where(y_any, ys + 1, 0).amax(-1)
    boxes = torch.stack([x0, y0, x1, y1], -1).to(torch.float32)
    return boxes * x_any.any(-1, keepdim=True)


def masks_to_boxes(masks: torch.Tensor) -> Boxes:
    """bool (n, H, W) -> Detectron2 ``Boxes`` (n, 4) of :func:`mask_boxes`."""
    n, H, W = masks.shape
    if n == 0 or H == 0 or W == 0:
        return Boxes(torch.zeros((n, 4), dtype=torch.float32, device=masks.device))
    return Boxes(mask_boxes(masks))


def paste_masks(
    probs: torch.Tensor, stride: int, image_size, output_size, threshold: float
) -> torch.Tensor:
    """probs (n, H/stride, W/stride) on the padded canvas -> bool (n, *output_size).

    Upsample by ``stride``, crop the un-padded ``image_size`` (h, w), resize to ``output_size``, binarise.
    """
    if probs.shape[0] == 0:  # split() of an empty tensor still yields one (empty) chunk
        return probs.new_zeros((0, *output_size), dtype=torch.bool)
    h, w = image_size
    out = []
    for chunk in probs.split(UPSAMPLE_CHUNK):
        m = F.interpolate(chunk[None], scale_factor=stride, mode="bilinear", align_corners=False)
        m = m[:, :, :h, :w]
        if tuple(output_size) != (h, w):  # a same-size bilinear resize is the identity: skip it
            m = F.interpolate(m, size=tuple(output_size), mode="bilinear", align_corners=False)
        out.append(m[0] > threshold)
    return torch.cat(out)


def instances_from_query_outputs(
    logits: torch.Tensor,
    kernels: torch.Tensor,
    mfr: torch.Tensor,
    image_size,
    output_size,
    stride: int,
    max_per_image: int = 100,
    mask_threshold: float = 0.5,
    use_maskness: bool = True,
    score_threshold: float = 0.0,
) -> Instances:
    """One image: logits (Q, K), kernels (Q, E), mfr (E, h, w) -> Instances at ``output_size`` with
    pred_masks (bool), scores, pred_classes and pred_boxes (tight boxes of the masks)."""
    scores, classes, queries = select_topk(logits, max_per_image)
    probs = MaskHead.mask_logits(kernels[queries], mfr).sigmoid()  # (k, h, w)
    if use_maskness:
        scores = scores * maskness(probs, mask_threshold)
    keep = (
        scores > score_threshold
        if score_threshold > 0
        else torch.ones_like(scores, dtype=torch.bool)
    )
    scores, classes, probs = scores[keep], classes[keep], probs[keep]
    result = Instances(tuple(output_size))
    masks = paste_masks(probs, stride, image_size, output_size, mask_threshold)
    result.pred_masks = masks
    result.pred_boxes = masks_to_boxes(masks)
    result.scores = scores
    result.pred_classes = classes
    return result
