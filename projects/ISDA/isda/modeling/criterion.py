"""Set criterion (paper Sec. 3.3; released code: mmdet/models/dense_heads/isda_head.py,
ISDAHead.loss_single): focal classification loss over all queries plus a mask loss on the matched
queries, for every decoder layer (deep supervision, equal weights). An optional per-pixel BCE on
the matched masks (``bce_weight``; 0 in the released code) can join the mask loss.

Ground-truth targets are built once per batch at MFR resolution and shared by all layers. Matching uses
all Q masks (without gradient), but the mask loss only recomputes the matched ones, since unmatched
queries carry zero mask weight: the result is identical and memory drops from D*B*Q to D*G masks.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from fvcore.nn import sigmoid_focal_loss
from torch import nn

from .mask_head import MaskHead
from .matcher import HungarianMatcher

DICE_EPS = 1e-3
IOU_EPS = 1e-6
MASK_LOSSES = ("dice", "iou")  # squared V-Net dice (released code) or soft 1 - IoU (paper)
GT_DOWNSAMPLE_MODES = ("bilinear", "nearest")  # soft edges (released code) or binary


def downsample_gt_masks(
    masks: torch.Tensor, padded_hw, stride: int, mode: str = "bilinear"
) -> torch.Tensor:
    """GT masks (G, h_i, w_i) bool/uint8 -> (G, H/stride, W/stride) float on the zero-padded batch canvas.

    "bilinear" keeps soft edges (released code: not re-binarised); "nearest" keeps them binary.
    """
    if mode not in GT_DOWNSAMPLE_MODES:
        raise ValueError(
            f"downsample_gt_masks: mode must be one of {GT_DOWNSAMPLE_MODES}, got {mode!r}"
        )
    H, W = padded_hw
    canvas = masks.new_zeros((masks.shape[0], H, W), dtype=torch.float32)
    canvas[:, : masks.shape[1], : masks.shape[2]] = masks.to(torch.float32)
    if masks.shape[0] == 0:
        return canvas[:, ::stride, ::stride]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(canvas[None], scale_factor=1.0 / stride, mode=mode, **kwargs)[0]


def dice_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared (V-Net) dice per mask: probs, targets (n, N) -> (n,)."""
    inter = (probs * targets).sum(1)
    denom = (probs * probs).sum(1) + DICE_EPS + (targets * targets).sum(1) + DICE_EPS
    return 1 - 2 * inter / denom


def soft_iou_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's 1 - IoU on probabilities: (n, N) -> (n,)."""
    inter = (probs * targets).sum(1)
    return 1 - inter / (probs.sum(1) + targets.sum(1) - inter + IOU_EPS)


def average_num_masks(targets: List[Dict[str, torch.Tensor]], device) -> float:
    """Number of GT masks averaged over processes, at least 1 (normaliser of both losses)."""
    n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(n)
    return max(n.item() / comm.get_world_size(), 1.0)


class SetCriterion(nn.Module):
    def __init__(
        self,
        matcher: HungarianMatcher,
        num_classes: int,
        class_weight: float = 2.0,
        mask_weight: float = 3.0,
        mask_loss: str = "dice",
        alpha: float = 0.25,
        gamma: float = 2.0,
        deep_supervision: bool = True,
        bce_weight: float = 0.0,
    ):
        super().__init__()
        if mask_loss not in MASK_LOSSES:
            raise ValueError(
                f"SetCriterion: mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}"
            )
        self.matcher, self.num_classes = matcher, num_classes
        self.class_weight, self.mask_weight = class_weight, mask_weight
        self.mask_loss_fn = dice_loss if mask_loss == "dice" else soft_iou_loss
        self.alpha, self.gamma, self.deep_supervision = alpha, gamma, deep_supervision
        self.bce_weight = bce_weight

    def forward(self, logits, kernels, mfr, targets) -> Dict[str, torch.Tensor]:
        """
        Args:
            logits: (D, B, Q, K); kernels: (D, B, Q, E); mfr: (B, E, h, w).
            targets: per image ``{"labels": (G,), "masks": (G, h, w) float}`` (see downsample_gt_masks).
        Returns:
            ``loss_cls``/``loss_mask`` of the last layer and ``loss_cls_i``/``loss_mask_i`` of layer i < D-1.
        """
        num_masks = average_num_masks(targets, logits.device)
        # One view per image, shared by every layer's mask loss: the backward then stacks their
        # gradients into F once, where indexing F per image and layer would add a zero-padded
        # full-size gradient for every (layer, image) pair.
        mfr_images = mfr.unbind(0)
        layers = range(len(logits)) if self.deep_supervision else [len(logits) - 1]
        losses = {}
        for i in layers:
            suffix = "" if i == len(logits) - 1 else f"_{i}"
            layer = self.layer_losses(logits[i], kernels[i], mfr, mfr_images, targets, num_masks)
            losses.update({name + suffix: value for name, value in layer.items()})
        return losses

    def layer_losses(
        self, logits, kernels, mfr, mfr_images, targets, num_masks
    ) -> Dict[str, torch.Tensor]:
        """One decoder layer: logits (B, Q, K), kernels (B, Q, E), mfr (B, E, h, w) and the same
        as B views (E, h, w) -> ``{"loss_cls", "loss_mask"}``."""
        with torch.no_grad():
            all_masks = MaskHead.mask_logits(kernels.detach(), mfr.detach())  # (B, Q, h, w)
        indices = self.matcher(logits, all_masks, targets)
        mask_loss, bce_loss = self.mask_loss(kernels, mfr_images, targets, indices)
        losses = {
            "loss_cls": self.class_weight * self.class_loss(logits, targets, indices) / num_masks,
            "loss_mask": self.mask_weight * mask_loss / num_masks,
        }
        if self.bce_weight > 0:
            losses["loss_mask_bce"] = self.bce_weight * bce_loss / num_masks
        return losses

    def class_loss(self, logits, targets, indices) -> torch.Tensor:
        """Sigmoid focal loss over all B x Q x K logits; background rows are all-zero targets."""
        onehot = torch.zeros_like(logits)
        for b, (q, g) in enumerate(indices):
            onehot[b, q.to(logits.device), targets[b]["labels"][g]] = 1.0
        return sigmoid_focal_loss(
            logits.float(), onehot.float(), self.alpha, self.gamma, reduction="sum"
        )

    def mask_loss(self, kernels, mfr_images, targets, indices):
        """Mask losses of the matched queries only, recomputing just their dynamic convolutions:
        kernels (B, Q, E), mfr_images B maps (E, h, w) -> (sum of the dice/IoU loss, sum of the
        per-mask mean pixel BCE; 0 when its weight is 0), both scalars over the matched masks."""
        total = kernels.sum() * 0.0  # keeps the graph connected when the batch has no GT at all
        bce = total
        for b, (q, g) in enumerate(indices):
            if len(q) == 0:
                continue
            k = kernels[b, q.to(kernels.device)]  # (n, E)
            logits = MaskHead.mask_logits(k, mfr_images[b]).flatten(1).float()  # (n, h*w)
            gt = targets[b]["masks"][g.to(kernels.device)].flatten(1)  # (n, h*w)
            total = total + self.mask_loss_fn(logits.sigmoid(), gt).sum()
            if self.bce_weight > 0:
                bce = (
                    bce
                    + F.binary_cross_entropy_with_logits(logits, gt, reduction="none").mean(1).sum()
                )
        return total, bce
