"""The three source layouts ISDA converts from, as data (see :mod:`isda.conversion`).

* ``ddetr``: the original release (fundamentalvision/Deformable-DETR,
  ``r50_deformable_detr-checkpoint.pth``), state dict under ``"model"``;
* ``mmdet``: MMDetection 2.x ``deformable_detr_r50_16x2_50e_coco`` (the checkpoint the authors
  used), state dict under ``"state_dict"``;
* ``torchvision``: an ImageNet ``resnet50`` file from torchvision (backbone only).

The tables are built on the first call of :func:`source_formats`, not at import: the ``ddetr`` class
mapping reads Detectron2's COCO metadata.
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import List, Mapping

from .rules import Drop, Keep, Rule, SourceFormat
from .transforms import coco91_to_80

__all__ = ["resnet_rules", "source_formats"]

# Parameter/buffer suffixes of a BatchNorm as the sources store it. num_batches_tracked exists in
# torchvision and mmdet files (nn.BatchNorm2d) but not in the DDETR release (FrozenBatchNorm2d).
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def resnet_rules(src: str, dst: str = "backbone.") -> List[Rule]:
    """torchvision ResNet names (prefix ``src``) -> Detectron2 ResNet names (prefix ``dst``).

    stage ``layer{s}`` is ``res{s+1}``; ``bn{c}`` is ``conv{c}.norm``; ``downsample.0/1`` is
    ``shortcut`` / ``shortcut.norm``. Works for Bottleneck (conv1-3) and BasicBlock (conv1-2).
    """
    rules = [Rule(f"{src}conv1.weight", f"{dst}stem.conv1.weight")]
    rules += [Rule(f"{src}bn1.{p}", f"{dst}stem.conv1.norm.{p}") for p in _BN_PARAMS]
    block_src, block_dst = f"{src}layer{{s}}.{{b}}.", f"{dst}res{{s+1}}.{{b}}."
    rules.append(Rule(f"{block_src}conv{{c}}.weight", f"{block_dst}conv{{c}}.weight"))
    rules += [Rule(f"{block_src}bn{{c}}.{p}", f"{block_dst}conv{{c}}.norm.{p}") for p in _BN_PARAMS]
    rules.append(Rule(f"{block_src}downsample.0.weight", f"{block_dst}shortcut.weight"))
    rules += [
        Rule(f"{block_src}downsample.1.{p}", f"{block_dst}shortcut.norm.{p}") for p in _BN_PARAMS
    ]
    return rules


def _linear(src: str, dst: str) -> List[Rule]:
    return [Rule(f"{src}.{p}", f"{dst}.{p}") for p in ("weight", "bias")]


_MSDA_PARTS = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")


def _msda(src: str, dst: str) -> List[Rule]:
    # Both sources view sampling_offsets as (heads, levels, points, 2) and attention_weights as
    # (heads, levels * points), as ISDA's MSDeformAttn does, so the tensors copy unchanged.
    return [r for part in _MSDA_PARTS for r in _linear(f"{src}.{part}", f"{dst}.{part}")]


def _mha(src: str, dst: str) -> List[Rule]:
    return [
        Rule(f"{src}.in_proj_weight", f"{dst}.in_proj_weight"),
        Rule(f"{src}.in_proj_bias", f"{dst}.in_proj_bias"),
    ] + _linear(f"{src}.out_proj", f"{dst}.out_proj")


# ISDA target names (projects/ISDA/isda/modeling). Encoder layer: self_attn, norm, ffn.{linear1,
# linear2, norm}. Decoder layer: self_attn (MHA), norm1, cross_attn (MSDA), norm2, ffn.*.
_ENC, _DEC = "transformer.encoder.{i}", "transformer.decoder.{i}"

# What ISDA has and no Deformable DETR has: the P2 lateral (new in ISDA's neck), the mask feature
# head (paper Fig. 3) and the kernel FFN (Fig. 4). Matching by regex keeps these lists short.
_ISDA_NEW = [
    Keep(r"neck\.lateral\.0\.", "P2 lateral conv: ISDA-only (Deformable DETR uses P3-P6)"),
    Keep(r"mask_feature_head\.", "mask feature head (MFR): ISDA-only"),
    Keep(r"mask_head\.kernel_branches\.", "kernel FFN: ISDA-only (DDETR box FFN differs)"),
]
_BN_COUNTER = Keep(r"num_batches_tracked\Z", "BatchNorm step counter, not a weight")
_BN_COUNTER_DROP = Drop(r".*num_batches_tracked\Z", "BatchNorm step counter")
_BOX_FFN = "box regression FFN: ISDA predicts masks, not boxes"
_SHARED_CLS = (
    "copy of class head 0: without box refinement one class FC is shared by all decoder layers "
    "(ISDA: MODEL.ISDA.SHARE_HEADS_ACROSS_LAYERS)"
)


def _ddetr_rules() -> List[Rule]:
    """fundamentalvision/Deformable-DETR (models/deformable_detr.py, deformable_transformer.py)."""
    rules = resnet_rules("backbone.0.body.")
    # input_proj.{0,1,2} = 1x1 conv + GN on C3, C4, C5; input_proj.3 = 3x3 s2 conv + GN on C5.
    for src, dst in [("input_proj.{j}", "neck.lateral.{j+1}"), ("input_proj.3", "neck.p6")]:
        rules += [Rule(f"{src}.0.weight", f"{dst}.weight")]
        rules += _linear(f"{src}.1", f"{dst}.norm")
    rules.append(Rule("transformer.level_embed", "transformer.level_embed"))
    enc = "transformer.encoder.layers.{i}"
    rules += _msda(f"{enc}.self_attn", f"{_ENC}.self_attn")
    rules += _linear(f"{enc}.norm1", f"{_ENC}.norm")
    rules += _linear(f"{enc}.linear1", f"{_ENC}.ffn.linear1")
    rules += _linear(f"{enc}.linear2", f"{_ENC}.ffn.linear2")
    rules += _linear(f"{enc}.norm2", f"{_ENC}.ffn.norm")
    dec = "transformer.decoder.layers.{i}"
    # The DDETR decoder layer *declares* cross_attn/norm1 before self_attn/norm2, but runs
    # self_attn -> norm2 -> cross_attn -> norm1 -> ffn -> norm3. Map by function.
    rules += _mha(f"{dec}.self_attn", f"{_DEC}.self_attn")
    rules += _linear(f"{dec}.norm2", f"{_DEC}.norm1")
    rules += _msda(f"{dec}.cross_attn", f"{_DEC}.cross_attn")
    rules += _linear(f"{dec}.norm1", f"{_DEC}.norm2")
    rules += _linear(f"{dec}.linear1", f"{_DEC}.ffn.linear1")
    rules += _linear(f"{dec}.linear2", f"{_DEC}.ffn.linear2")
    rules += _linear(f"{dec}.norm3", f"{_DEC}.ffn.norm")
    rules += _linear("transformer.reference_points", "transformer.reference_points")
    # Rows are [query_pos | target] in both models (torch.split(query_embed, C, dim=1)).
    rules.append(Rule("query_embed.weight", "query_embedding.weight"))
    classes = coco91_to_80()
    rules += [
        Rule(f"class_embed.{{k}}.{p}", f"mask_head.class_branches.{{k}}.{p}", classes)
        for p in ("weight", "bias")
    ]
    return rules


def _mmdet_rules() -> List[Rule]:
    """MMDetection 2.x DeformableDETR (mmdet/models/utils/transformer.py, dense_heads/
    deformable_detr_head.py, necks/channel_mapper.py; mmcv cnn/bricks/transformer.py)."""
    rules = resnet_rules("backbone.")
    # ChannelMapper: ConvModule(conv, gn) without conv bias; extra_convs.0 is 3x3 s2 on C5.
    for src, dst in [("neck.convs.{j}", "neck.lateral.{j+1}"), ("neck.extra_convs.0", "neck.p6")]:
        rules += [Rule(f"{src}.conv.weight", f"{dst}.weight")]
        rules += _linear(f"{src}.gn", f"{dst}.norm")
    tr = "bbox_head.transformer"
    rules.append(Rule(f"{tr}.level_embeds", "transformer.level_embed"))
    # mmcv BaseTransformerLayer numbers attentions/norms/ffns in operation order. Encoder:
    # (self_attn, norm, ffn, norm). FFN: layers.0 = Sequential(Linear, ReLU, Dropout),
    # layers.1 = Linear.
    enc = f"{tr}.encoder.layers.{{i}}"
    rules += _msda(f"{enc}.attentions.0", f"{_ENC}.self_attn")
    rules += _linear(f"{enc}.norms.0", f"{_ENC}.norm")
    rules += _linear(f"{enc}.ffns.0.layers.0.0", f"{_ENC}.ffn.linear1")
    rules += _linear(f"{enc}.ffns.0.layers.1", f"{_ENC}.ffn.linear2")
    rules += _linear(f"{enc}.norms.1", f"{_ENC}.ffn.norm")
    # Decoder: (self_attn, norm, cross_attn, norm, ffn, norm); the MHA wrapper holds nn.MHA as
    # .attn.
    dec = f"{tr}.decoder.layers.{{i}}"
    rules += _mha(f"{dec}.attentions.0.attn", f"{_DEC}.self_attn")
    rules += _linear(f"{dec}.norms.0", f"{_DEC}.norm1")
    rules += _msda(f"{dec}.attentions.1", f"{_DEC}.cross_attn")
    rules += _linear(f"{dec}.norms.1", f"{_DEC}.norm2")
    rules += _linear(f"{dec}.ffns.0.layers.0.0", f"{_DEC}.ffn.linear1")
    rules += _linear(f"{dec}.ffns.0.layers.1", f"{_DEC}.ffn.linear2")
    rules += _linear(f"{dec}.norms.2", f"{_DEC}.ffn.norm")
    rules += _linear(f"{tr}.reference_points", "transformer.reference_points")
    rules.append(Rule("bbox_head.query_embedding.weight", "query_embedding.weight"))
    # 80 sigmoid logits in CocoDataset order (sorted category ids) = Detectron2's order: no remap.
    rules += _linear("bbox_head.cls_branches.{k}", "mask_head.class_branches.{k}")
    return rules


def _ddetr() -> SourceFormat:
    neck_bias = (
        "conv bias before GroupNorm: ISDA's neck convs have none (mmdet layout); GN does not "
        "cancel a per-channel bias exactly, so this is a small perturbation that fine-tuning absorbs"
    )
    return SourceFormat(
        name="ddetr",
        description="fundamentalvision/Deformable-DETR r50_deformable_detr-checkpoint.pth",
        container_key="model",
        signature="transformer.level_embed",
        rules=_ddetr_rules(),
        drops=[
            Drop(r"bbox_embed\.", _BOX_FFN),
            Drop(r"class_embed\.[1-9]\d*\.", _SHARED_CLS),
            Drop(r"input_proj\.\d+\.0\.bias\Z", neck_bias, lossy=True),
            _BN_COUNTER_DROP,
        ],
        keeps=_ISDA_NEW + [_BN_COUNTER],
    )


def _mmdet() -> SourceFormat:
    return SourceFormat(
        name="mmdet",
        description="MMDetection 2.x deformable_detr_r50_16x2_50e_coco",
        container_key="state_dict",
        signature="bbox_head.transformer.level_embeds",
        rules=_mmdet_rules(),
        drops=[
            Drop(r"bbox_head\.reg_branches\.", _BOX_FFN),
            Drop(r"bbox_head\.cls_branches\.[1-9]\d*\.", _SHARED_CLS),
            _BN_COUNTER_DROP,
        ],
        keeps=_ISDA_NEW + [_BN_COUNTER],
    )


def _torchvision() -> SourceFormat:
    return SourceFormat(
        name="torchvision",
        description="torchvision ImageNet ResNet (e.g. resnet50-0676ba61.pth)",
        container_key=None,
        signature="layer1.0.conv1.weight",
        rules=resnet_rules(""),
        drops=[Drop(r"fc\.", "ImageNet classifier"), _BN_COUNTER_DROP],
        keeps=[
            Keep(
                r"(?!backbone\.)",
                "not part of an ImageNet ResNet: keeps ISDA's own initialisation",
            ),
            _BN_COUNTER,
        ],
    )


@functools.lru_cache(maxsize=None)
def source_formats() -> Mapping[str, SourceFormat]:
    """Format name -> :class:`SourceFormat`, in the order format detection tries them."""
    return MappingProxyType({fmt.name: fmt for fmt in (_ddetr(), _mmdet(), _torchvision())})
