"""Deformable Transformer (paper Fig. 2, "Deformable Transformer"): encoder over P3..P6, decoder over
learned object queries. Single-scale queries, no box refinement, no two-stage (released code:
mmdet/models/utils/transformer.py, DeformableDetrTransformer, called by ISDAHead.forward without
reg_branches).

Encoder layer (post-norm):  x = LN(x + MSDA(x + pos)); x = LN(x + FFN(x)).
Decoder layer (post-norm):  q = LN(q + MHA(q + qpos)); q = LN(q + MSDA(q + qpos)); q = LN(q + FFN(q)).
Reference points of the queries are sigmoid(Linear(query_pos)), identical for every image and every layer.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import MSDeformAttn
from ..layers.recording import recording_graph, size_tensor

# Which layers recompute their forward in the backward instead of storing activations.
CHECKPOINT_MODES = ("none", "encoder", "encoder_decoder")


class FFN(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear -> Dropout, with the residual and post-LayerNorm."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear2(self.dropout1(F.relu(self.linear1(x), inplace=True)))
        return self.norm(x + self.dropout2(y))


class EncoderLayer(nn.Module):
    def __init__(self, dim, ffn_dim, dropout, n_levels, n_heads, n_points, impl=None):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, n_levels, n_heads, n_points, impl=impl)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos: (B, S, C); reference_points: (B, S, L, 2); padding_mask: (B, S) -> (B, S, C)"""
        out = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        return self.ffn(self.norm(src + self.dropout(out)))


class DecoderLayer(nn.Module):
    def __init__(self, dim, ffn_dim, dropout, n_levels, n_heads, n_points, impl=None):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, n_levels, n_heads, n_points, impl=impl)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        memory_padding_mask,
    ):
        """tgt, query_pos: (B, Q, C); reference_points: (B, Q, L, 2); memory: (B, S, C) -> (B, Q, C)"""
        q = k = (tgt + query_pos).transpose(0, 1)  # MultiheadAttention is sequence-first
        out = self.self_attn(q, k, tgt.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
        tgt = self.norm1(tgt + self.dropout1(out))
        out = self.cross_attn(
            tgt + query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
        )
        tgt = self.norm2(tgt + self.dropout2(out))
        return self.ffn(tgt)


def flatten_levels(
    feats: List[torch.Tensor], masks: List[torch.Tensor], pos: List[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenates L maps into token sequences.

    feats[l], pos[l]: (B, C, H_l, W_l); masks[l]: (B, H_l, W_l) ->
    tokens (B, S, C), padding (B, S), pos (B, S, C), spatial_shapes (L, 2) int64, level_start_index (L,).
    """
    # Built from the maps' sizes (not a Python list of ints), so a traced graph keeps them symbolic.
    device = feats[0].device
    shapes = torch.stack([size_tensor(f.shape[-2:], device) for f in feats])
    level_start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    # permute + flatten is a free view for channels-last maps (and one copy for NCHW maps).
    tokens = torch.cat([f.permute(0, 2, 3, 1).flatten(1, 2) for f in feats], 1)
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    pos_tokens = torch.cat([p.permute(0, 2, 3, 1).flatten(1, 2) for p in pos], 1)
    return tokens, padding, pos_tokens, shapes, level_start


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, H, W), True on padding -> (B, 2) fraction of valid (x, y) extent."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32)
    valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32)
    return torch.stack([valid_w / W, valid_h / H], -1)


def encoder_reference_points(level_sizes: Sequence[Sequence], ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level, expressed on every level: -> (B, S, L, 2) normalised (x, y).

    level_sizes: L sizes (H_l, W_l), taken from the maps' ``shape`` so that they stay symbolic when
    the model is traced or exported. ratios: (B, L, 2) valid ratios. A centre is normalised by the
    valid extent of its own level, then scaled by the valid ratio of each target level, so points
    stay inside each level's valid area.
    """
    refs = []
    for lvl, (h, w) in enumerate(level_sizes):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=ratios.device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=ratios.device) + 0.5,
            indexing="ij",
        )
        x = xs.reshape(1, -1) / (ratios[:, None, lvl, 0] * w)
        y = ys.reshape(1, -1) / (ratios[:, None, lvl, 1] * h)
        refs.append(torch.stack((x, y), -1))
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


class DeformableTransformer(nn.Module):
    """Encoder + decoder. ``forward`` returns the decoder states of every layer and the reference points.

    Args of forward:
        feats: L maps (B, C, H_l, W_l); masks: L bool maps (B, H_l, W_l), True on padding;
        pos: L sine encodings (B, C, H_l, W_l); query_embed: (Q, 2C) = [query_pos | target].
    Returns:
        hs: (num_decoder_layers, B, Q, C); reference_points: (B, Q, 2) in [0, 1] as (x, y).

    ``checkpointing``: "none", "encoder" or "encoder_decoder": the layers that keep only their inputs
    in training and recompute the rest in the backward (same values, less memory, more time).
    """

    def __init__(
        self,
        dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        enc_points: int = 4,
        dec_points: int = 4,
        impl: Optional[str] = None,
        checkpointing: str = "none",
    ):
        super().__init__()
        if checkpointing not in CHECKPOINT_MODES:
            raise ValueError(
                f"DeformableTransformer: checkpointing={checkpointing!r} must be one of "
                f"{CHECKPOINT_MODES}"
            )
        self.checkpoint_encoder = checkpointing != "none"
        self.checkpoint_decoder = checkpointing == "encoder_decoder"
        self.encoder = nn.ModuleList(
            [
                EncoderLayer(dim, ffn_dim, dropout, n_levels, nheads, enc_points, impl)
                for _ in range(enc_layers)
            ]
        )
        self.decoder = nn.ModuleList(
            [
                DecoderLayer(dim, ffn_dim, dropout, n_levels, nheads, dec_points, impl)
                for _ in range(dec_layers)
            ]
        )
        self.level_embed = nn.Parameter(torch.empty(n_levels, dim))
        self.reference_points = nn.Linear(dim, 2)
        self.dim, self.n_levels = dim, n_levels
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # MSDeformAttn then restores its structured init (zero offsets weight, rotating-grid bias).
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def _run_layer(self, layer: nn.Module, recompute: bool, *args) -> torch.Tensor:
        """``layer(*args)``; with ``recompute`` (and gradients on) the layer keeps only its inputs for
        the backward and runs again there, trading one more forward for its activations (the
        encoder's 20k-token FFN and attention tensors). Non-reentrant checkpointing replays the
        dropout masks and the autocast state, and works with DDP's gradient hooks."""
        if recompute and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def encode(self, feats, masks, pos):
        """-> memory (B, S, C), padding (B, S) or None when nothing is padded, spatial_shapes (L, 2),
        level_start (L,), ratios (B, L, 2)"""
        pos = [p + self.level_embed[lvl].view(1, -1, 1, 1) for lvl, p in enumerate(pos)]
        src, padding, pos_tokens, shapes, level_start = flatten_levels(feats, masks, pos)
        # A batch without padding skips 2 x (enc + dec layers) masked fills. A recorded graph always
        # applies the mask instead (an all-False fill changes nothing), as it cannot branch on values.
        if not recording_graph() and not padding.any():
            padding = None
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        refs = encoder_reference_points([m.shape[-2:] for m in masks], ratios)
        for layer in self.encoder:
            src = self._run_layer(
                layer, self.checkpoint_encoder, src, pos_tokens, refs, shapes, level_start, padding
            )
        return src, padding, shapes, level_start, ratios

    def decode(self, memory, padding, shapes, level_start, ratios, query_embed):
        B = memory.shape[0]
        query_pos, tgt = query_embed.split(self.dim, dim=1)
        query_pos = query_pos[None].expand(B, -1, -1)
        tgt = tgt[None].expand(B, -1, -1)
        reference_points = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)
        refs = reference_points[:, :, None] * ratios[:, None]  # (B, Q, L, 2)
        states = []
        for layer in self.decoder:
            tgt = self._run_layer(
                layer,
                self.checkpoint_decoder,
                tgt,
                query_pos,
                refs,
                memory,
                shapes,
                level_start,
                padding,
            )
            states.append(tgt)
        return torch.stack(states), reference_points

    def forward(self, feats, masks, pos, query_embed):
        memory, padding, shapes, level_start, ratios = self.encode(feats, masks, pos)
        return self.decode(memory, padding, shapes, level_start, ratios, query_embed)
