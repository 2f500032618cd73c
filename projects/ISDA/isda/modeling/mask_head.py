"""Mask head (paper Fig. 4): per decoder state, a class FFN and a kernel FFN whose output, extended by
the query's reference point (KP), is a position-aware dynamic 1x1 kernel applied to the MFR F.

    logits_q = Linear(h_q)                                    (K,)
    G_q      = KernelFFN(h_q) ++ enc(r_q)   if KP else  KernelFFN(h_q)      (MFR_OUT_DIM,)
    m_q(x)   = sum_c G_q[c] * F[c](x)                         mask logits (spec §4)
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


def dynamic_mask_logits(kernels: torch.Tensor, mfr: torch.Tensor) -> torch.Tensor:
    """The dynamic 1x1 convolution without bias: kernels (B, Q, C) x F (B, C, h, w) -> (B, Q, h, w)."""
    B, C, h, w = mfr.shape
    return torch.bmm(kernels, mfr.reshape(B, C, h * w)).view(B, -1, h, w)


class _KernelFFN(nn.Sequential):
    def __init__(self, dim: int, out_dim: int, hidden_layers: int):
        layers = []
        for _ in range(hidden_layers):
            layers += [nn.Linear(dim, dim), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.Linear(dim, out_dim))


class MaskHead(nn.Module):
    """Class and kernel predictions for every decoder layer.

    forward(hs (D, B, Q, C), reference_points (B, Q, 2)) -> logits (D, B, Q, K), kernels (D, B, Q, E),
    with E = ``kernel_dim`` = the channel count of F.
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
