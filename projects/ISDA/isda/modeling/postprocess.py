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
    In eager CPU runs a mask is computed only in the part of the image where it can pass the
    threshold (:func:`_paste_windowed`); recorded graphs and other devices upsample every mask over
    the whole image (:func:`_paste_whole`).
    """
    if probs.shape[0] == 0:  # split() of an empty tensor still yields one (empty) chunk
        return probs.new_zeros((0, *output_size), dtype=torch.bool)
    if probs.device.type == "cpu" and not recording_graph():
        return _paste_windowed(probs, stride, image_size, output_size, threshold)
    return _paste_whole(probs, stride, image_size, output_size, threshold)


def _paste_whole(probs, stride: int, image_size, output_size, threshold: float) -> torch.Tensor:
    """:func:`paste_masks` by upsampling every mask over the whole image, UPSAMPLE_CHUNK at a time."""
    h, w = image_size
    out = []
    for chunk in probs.split(UPSAMPLE_CHUNK):
        m = F.interpolate(chunk[None], scale_factor=stride, mode="bilinear", align_corners=False)
        m = m[:, :, :h, :w]
        if tuple(output_size) != (h, w):  # a same-size bilinear resize is the identity: skip it
            m = F.interpolate(m, size=tuple(output_size), mode="bilinear", align_corners=False)
        out.append(m[0] > threshold)
    return torch.cat(out)


# Low-resolution pixels within this margin below the threshold count as "may pass it": a bilinear
# value is a convex combination of its inputs, but float rounding can raise it by a few ulps.
WINDOW_MARGIN = 1e-4
# A mask whose window covers more than this share of the image is upsampled whole, in a chunk:
# one batched interpolation is cheaper than the per-mask crops there.
WINDOW_MAX_SHARE = 0.5


def _paste_windowed(probs, stride: int, image_size, output_size, threshold: float):
    """:func:`paste_masks`, each mask computed only in the window where it can pass ``threshold``.

    A bilinear value lies between its source values, so beyond the reach of the low-resolution
    pixels above ``threshold - WINDOW_MARGIN`` every upsampled pixel stays below the threshold and
    is False without being computed. Inside the window the stride upsampling is bit for bit that of
    the whole image (:func:`_upsample_window`); the resize to ``output_size``, when one is needed,
    uses F.interpolate's indices and weights (:class:`_Resize1d`) and agrees with it to float
    rounding.
    """
    (h, w), (oh, ow) = image_size, tuple(output_size)
    reach = list(_reach(probs, stride, image_size, threshold))
    area = [(rows[1] - rows[0]) * (cols[1] - cols[0]) for rows, cols in reach]
    whole = [i for i, a in enumerate(area) if a > WINDOW_MAX_SHARE * h * w]
    if len(whole) == len(reach):
        return _paste_whole(probs, stride, image_size, output_size, threshold)
    resize = (_Resize1d(h, oh), _Resize1d(w, ow)) if (oh, ow) != (h, w) else None
    out = torch.zeros((probs.shape[0], oh, ow), dtype=torch.bool)
    for i, (rows, cols) in enumerate(reach):
        if 0 < area[i] <= WINDOW_MAX_SHARE * h * w:
            _paste_one(out[i], probs[i], stride, rows, cols, resize, threshold)
    if whole:
        index = torch.tensor(whole)
        out[index] = _paste_whole(probs[index], stride, image_size, output_size, threshold)
    return out


def _reach(probs, stride: int, image_size, threshold: float):
    """probs (n, H', W') -> per mask, the upsampled rows [y0, y1) and columns [x0, x1) inside the
    image that a low-resolution pixel above ``threshold - WINDOW_MARGIN`` reaches (empty ranges
    for a mask that cannot pass). Upsampled pixel y reads source rows floor((y + 0.5) / stride -
    0.5) and the next one, so source rows [r0, r1) reach at most [stride (r0 - 1), stride (r1 + 1)).
    """
    h, w = image_size
    boxes = mask_boxes(probs > threshold - WINDOW_MARGIN).long().tolist()  # zeros when empty
    for x0, y0, x1, y1 in boxes:
        if x1 == 0:
            yield (0, 0), (0, 0)
            continue
        rows = (max(stride * (y0 - 1), 0), min(stride * (y1 + 1), h))
        yield rows, (max(stride * (x0 - 1), 0), min(stride * (x1 + 1), w))


def _paste_one(out, p, stride: int, rows, cols, resize, threshold: float) -> None:
    """Writes one mask's window into ``out`` (oh, ow) bool; p (H', W'); rows, cols: its reach."""
    if resize is None:
        out[rows[0] : rows[1], cols[0] : cols[1]] = (
            _upsample_window(p, stride, rows, cols) > threshold
        )
        return
    ry, rx = resize
    (u0, u1), (v0, v1) = ry.window(*rows), rx.window(*cols)
    if u0 >= u1 or v0 >= v1:
        return
    src_rows = (int(ry.i0[u0]), int(ry.i1[u1 - 1]) + 1)  # the sources those destinations read
    src_cols = (int(rx.i0[v0]), int(rx.i1[v1 - 1]) + 1)
    up = _upsample_window(p, stride, src_rows, src_cols)
    across = rx.apply(up, 1, v0, v1, src_cols[0])  # columns first, then rows, as F.interpolate
    out[u0:u1, v0:v1] = ry.apply(across, 0, u0, u1, src_rows[0]) > threshold


def _upsample_window(p: torch.Tensor, stride: int, rows, cols) -> torch.Tensor:
    """p (H', W') -> its ``stride``-times upsampling on [rows) x [cols), bit for bit what
    F.interpolate of the whole map gives there. The low-resolution crop keeps two pixels of margin
    on each side, so the crop's own border clamping never reaches the returned values, and with a
    power-of-two stride every source coordinate is the same float as in the whole map."""
    (y0, y1), (x0, x1) = rows, cols
    H, W = p.shape
    a, b = max(y0 // stride - 2, 0), min((y1 - 1) // stride + 3, H)
    c, d = max(x0 // stride - 2, 0), min((x1 - 1) // stride + 3, W)
    up = F.interpolate(p[None, None, a:b, c:d], scale_factor=stride, mode="bilinear")[0, 0]
    return up[y0 - a * stride : y1 - a * stride, x0 - c * stride : x1 - c * stride]


class _Resize1d:
    """One axis of F.interpolate's bilinear resize (align_corners=False) from ``size_in`` to
    ``size_out``: destination i reads ``src = max((i + 0.5) * size_in / size_out - 0.5, 0)``
    between sources ``i0 = floor(src)`` and ``i1 = min(i0 + 1, size_in - 1)``, weights 1 - l, l."""

    def __init__(self, size_in: int, size_out: int):
        scale = torch.tensor(size_in, dtype=torch.float32) / size_out
        src = ((torch.arange(size_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
        self.i0 = src.long()
        self.i1 = (self.i0 + 1).clamp(max=size_in - 1)
        self.l1 = src - self.i0
        self.l0 = 1.0 - self.l1

    def window(self, lo: int, hi: int) -> Tuple[int, int]:
        """-> [a, b): the destinations that read a source in [lo, hi) (both indices increase)."""
        return int(torch.searchsorted(self.i1, lo)), int(torch.searchsorted(self.i0, hi))

    def apply(self, x: torch.Tensor, dim: int, a: int, b: int, origin: int) -> torch.Tensor:
        """x: sources from ``origin`` on along ``dim`` -> destinations [a, b) along ``dim``."""
        shape = [1, 1]
        shape[dim] = b - a
        i0, i1 = self.i0[a:b] - origin, self.i1[a:b] - origin
        l0, l1 = self.l0[a:b].view(shape), self.l1[a:b].view(shape)
        return x.index_select(dim, i0) * l0 + x.index_select(dim, i1) * l1


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
