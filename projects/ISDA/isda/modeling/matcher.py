"""Hungarian matching of queries to ground-truth instances (paper Sec. 3.3; released code:
mmdet/core/bbox/assigners/mask_hungarian_assigner.py, with FocalLossCost and MaskIoUCost from
mmdet/core/bbox/match_costs/match_cost.py).

C(q, j) = w_cls * focal_cost(q, c_j) + w_mask * (1 - softIoU(P_q, G_j)), solved per image with
``scipy.optimize.linear_sum_assignment``. Costs are computed in fp32 even under autocast.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

FOCAL_EPS = 1e-12
IOU_EPS = 1e-6
# linear_sum_assignment raises on NaN/Inf; a diverged prediction must lose every match, not crash.
COST_LIMIT = 1e8


def focal_class_cost(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """logits (Q, K), labels (G,) -> (Q, G): positive focal term minus negative focal term."""
    p = logits.sigmoid()
    neg = (1 - alpha) * p.pow(gamma) * -(1 - p + FOCAL_EPS).log()
    pos = alpha * (1 - p).pow(gamma) * -(p + FOCAL_EPS).log()
    return (pos - neg)[:, labels]


def soft_iou_cost(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """probs (Q, N) and soft targets (G, N) in [0, 1] -> (Q, G) = 1 - soft IoU."""
    inter = probs @ targets.t()
    union = probs.sum(1)[:, None] + targets.sum(1)[None, :] - inter
    return 1 - inter / (union + IOU_EPS)


def sanitize_cost(cost: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(cost, nan=COST_LIMIT, posinf=COST_LIMIT, neginf=-COST_LIMIT).clamp(
        -COST_LIMIT, COST_LIMIT
    )


class HungarianMatcher(nn.Module):
    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 3.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        self.cost_class, self.cost_mask = cost_class, cost_mask
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(
        self,
        logits: torch.Tensor,
        mask_logits: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            logits: (B, Q, K) class logits; mask_logits: (B, Q, h, w) at MFR resolution.
            targets: per image ``{"labels": (G,) int64, "masks": (G, h, w) float in [0, 1]}``.
        Returns:
            per image (query_idx, gt_idx), two int64 CPU tensors of length min(Q, G).
        """
        out = []
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for b, t in enumerate(targets):
                if len(t["labels"]) == 0:
                    empty = torch.empty(0, dtype=torch.int64)
                    out.append((empty, empty))
                    continue
                cost = self.cost_class * focal_class_cost(
                    logits[b].float(), t["labels"], self.alpha, self.gamma
                ) + self.cost_mask * soft_iou_cost(
                    mask_logits[b].flatten(1).float().sigmoid(), t["masks"].flatten(1).float()
                )
                q, g = linear_sum_assignment(sanitize_cost(cost).cpu().numpy())
                out.append(
                    (torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(g, dtype=torch.int64))
                )
        return out
