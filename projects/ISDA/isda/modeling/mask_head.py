"""Position-aware mask head (paper Fig. 4; released code: mmdet/models/dense_heads/isda_head.py,
ISDAHead). Per decoder state h_q: a class FFN, and a kernel FFN whose output, extended by the
query's reference point r_q (KP), is a dynamic 1x1 kernel G_q applied to the MFR F (Fig. 3), which
gives the query's mask.

    logits_q = Linear(h_q)                                                  (K,)
    G_q      = KernelFFN(h_q) ++ enc(r_q)   if KP else  KernelFFN(h_q)      (E,) = channels of F
    m_q(x)   = sum_c G_q[c] * F[c](x)       mask logits: a 1x1 conv without bias
                                            (released code: ISDAHead._get_masks_single)

``MaskHead`` owns all three steps: ``forward`` gives the class logits and kernels of every decoder
layer, ``mask_logits`` the masks of any chosen kernels (all queries for matching, the matched ones
for the loss, the top-k ones at inference).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

REF_ENCODINGS = ("logit", "unit", "signed")  # how the reference point enters the kernel (KP)
REF_DIM = 2
REF_LOGIT_EPS = 1e-5


def encode_reference(ref: torch.Tensor, encoding: str) -> torch.Tensor:
    """ref (..., 2) in [0, 1] -> (..., 2): "logit" = inverse sigmoid (released code, about +-11.5),
    "unit" = unchanged, "signed" = 2r - 1 (the range of the MFR coordinate channels)."""
    if encoding == "logit":
        ref = ref.clamp(0, 1)
        return torch.log(ref.clamp(min=REF_LOGIT_EPS) / (1 - ref).clamp(min=REF_LOGIT_EPS))
    if encoding == "unit":
        return ref
    if encoding == "signed":
        return 2 * ref - 1
    raise ValueError(f"encode_reference: encoding must be one of {REF_ENCODINGS}, got {encoding!r}")


class _KernelFFN(nn.Sequential):
    def __init__(self, dim: int, out_dim: int, hidden_layers: int):
        layers = []
        for _ in range(hidden_layers):
            layers += [nn.Linear(dim, dim), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.Linear(dim, out_dim))


class MaskHead(nn.Module):
    """Class logits, position-aware kernels and masks for every decoder layer.

    forward(hs (D, B, Q, C), reference_points (B, Q, 2)) -> logits (D, B, Q, K), kernels (D, B, Q, E),
    with E = ``kernel_dim`` = the channel count of F; ``mask_logits(kernels, F)`` -> masks.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        kernel_dim: int,
        num_layers: int,
        kernel_ffn_layers: int = 2,
        kernel_ref: bool = True,
        ref_encoding: str = "logit",
        ref_detach: bool = False,
        share_across_layers: bool = True,
    ):
        super().__init__()
        if ref_encoding not in REF_ENCODINGS:
            raise ValueError(
                f"MaskHead: ref_encoding must be one of {REF_ENCODINGS}, got {ref_encoding!r}"
            )
        self.kernel_ref, self.ref_encoding, self.ref_detach = kernel_ref, ref_encoding, ref_detach
        class_fc = nn.Linear(dim, num_classes)
        # Focal-loss prior 0.01, so the 300 x K sigmoid outputs start near background.
        nn.init.constant_(class_fc.bias, -math.log((1 - 0.01) / 0.01))
        kernel_ffn = _KernelFFN(dim, kernel_dim - (REF_DIM if kernel_ref else 0), kernel_ffn_layers)
        n = 1 if share_across_layers else num_layers
        self.class_branches = nn.ModuleList([copy.deepcopy(class_fc) for _ in range(n)])
        self.kernel_branches = nn.ModuleList([copy.deepcopy(kernel_ffn) for _ in range(n)])

    def forward(self, hs: torch.Tensor, reference_points: torch.Tensor):
        ref = reference_points.detach() if self.ref_detach else reference_points
        ref_code = encode_reference(ref, self.ref_encoding)  # (B, Q, 2)
        logits, kernels = [], []
        for i, h in enumerate(hs):
            j = min(i, len(self.class_branches) - 1)
            logits.append(self.class_branches[j](h))
            k = self.kernel_branches[j](h)
            kernels.append(torch.cat([k, ref_code], -1) if self.kernel_ref else k)
        return torch.stack(logits), torch.stack(kernels)

    @staticmethod
    def mask_logits(kernels: torch.Tensor, mfr: torch.Tensor) -> torch.Tensor:
        """The dynamic 1x1 convolution without bias, m = G (.) F.

        kernels (..., n, E) and F (..., E, h, w) with the same leading dims (e.g. B, or none)
        -> mask logits (..., n, h, w).
        """
        h, w = mfr.shape[-2:]
        return torch.matmul(kernels, mfr.flatten(-2)).unflatten(-1, (h, w))
