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
from typing import Callable, Dict, List, Mapping, Sequence

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


# ISDA's encoder and decoder layer parts (isda/modeling/deformable_transformer.py) and the rules
# that copy each kind of part.
_ENC, _DEC = "transformer.encoder.{i}", "transformer.decoder.{i}"
_FFN_PARTS = {"ffn.linear1": _linear, "ffn.linear2": _linear, "ffn.norm": _linear}
_ENC_PARTS = {"self_attn": _msda, "norm": _linear, **_FFN_PARTS}
_DEC_PARTS = {
    "self_attn": _mha,
    "norm1": _linear,
    "cross_attn": _msda,
    "norm2": _linear,
    **_FFN_PARTS,
}


def _layer_rules(
    src_layer: str,
    dst_layer: str,
    parts: Dict[str, Callable[[str, str], List[Rule]]],
    source_names: Mapping[str, str],
) -> List[Rule]:
    """Rules for one templated encoder or decoder layer; ``source_names`` maps each ISDA part name
    to the source's name for it."""
    return [
        rule
        for part, rules_of in parts.items()
        for rule in rules_of(f"{src_layer}.{source_names[part]}", f"{dst_layer}.{part}")
    ]


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
    ffn = {"ffn.linear1": "linear1", "ffn.linear2": "linear2"}
    enc_names = {"self_attn": "self_attn", "norm": "norm1", "ffn.norm": "norm2", **ffn}
    rules += _layer_rules("transformer.encoder.layers.{i}", _ENC, _ENC_PARTS, enc_names)
    # The DDETR decoder layer *declares* cross_attn/norm1 before self_attn/norm2, but runs
    # self_attn -> norm2 -> cross_attn -> norm1 -> ffn -> norm3. Map by function.
    dec_names = {"self_attn": "self_attn", "norm1": "norm2", "cross_attn": "cross_attn"}
    dec_names.update({"norm2": "norm1", "ffn.norm": "norm3", **ffn})
    rules += _layer_rules("transformer.decoder.layers.{i}", _DEC, _DEC_PARTS, dec_names)
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
    # (self_attn, norm, ffn, norm); decoder: (self_attn, norm, cross_attn, norm, ffn, norm). FFN:
    # layers.0 = Sequential(Linear, ReLU, Dropout), layers.1 = Linear. The decoder's MHA wrapper
    # holds nn.MultiheadAttention as .attn.
    ffn = {"ffn.linear1": "ffns.0.layers.0.0", "ffn.linear2": "ffns.0.layers.1"}
    enc_names = {"self_attn": "attentions.0", "norm": "norms.0", "ffn.norm": "norms.1", **ffn}
    rules += _layer_rules(f"{tr}.encoder.layers.{{i}}", _ENC, _ENC_PARTS, enc_names)
    dec_names = {"self_attn": "attentions.0.attn", "norm1": "norms.0", "cross_attn": "attentions.1"}
    dec_names.update({"norm2": "norms.1", "ffn.norm": "norms.2", **ffn})
    rules += _layer_rules(f"{tr}.decoder.layers.{{i}}", _DEC, _DEC_PARTS, dec_names)
    rules += _linear(f"{tr}.reference_points", "transformer.reference_points")
    rules.append(Rule("bbox_head.query_embedding.weight", "query_embedding.weight"))
    # 80 sigmoid logits in CocoDataset order (sorted category ids) = Detectron2's order: no remap.
    rules += _linear("bbox_head.cls_branches.{k}", "mask_head.class_branches.{k}")
    return rules


def _deformable_detr(
    name: str,
    description: str,
    container_key: str,
    signature: str,
    rules: List[Rule],
    *,
    box: str,
    class_copies: str,
    extra: Sequence[Drop] = (),
) -> SourceFormat:
    """A Deformable DETR release. Its box FFNs (regex ``box``), the per-layer copies of class head
    0 (regex ``class_copies``) and ``extra`` are dropped; ISDA's own modules keep their init."""
    return SourceFormat(
        name=name,
        description=description,
        container_key=container_key,
        signature=signature,
        rules=rules,
        drops=[
            Drop(box, _BOX_FFN),
            Drop(class_copies, _SHARED_CLS),
            *extra,
            _BN_COUNTER_DROP,
        ],
        keeps=_ISDA_NEW + [_BN_COUNTER],
    )


def _ddetr() -> SourceFormat:
    neck_bias = (
        "conv bias before GroupNorm: ISDA's neck convs have none (mmdet layout); GN does not "
        "cancel a per-channel bias exactly, so this is a small perturbation that fine-tuning "
        "absorbs"
    )
    return _deformable_detr(
        "ddetr",
        "fundamentalvision/Deformable-DETR r50_deformable_detr-checkpoint.pth",
        "model",
        "transformer.level_embed",
        _ddetr_rules(),
        box=r"bbox_embed\.",
        class_copies=r"class_embed\.[1-9]\d*\.",
        extra=[Drop(r"input_proj\.\d+\.0\.bias\Z", neck_bias, lossy=True)],
    )


def _mmdet() -> SourceFormat:
    return _deformable_detr(
        "mmdet",
        "MMDetection 2.x deformable_detr_r50_16x2_50e_coco",
        "state_dict",
        "bbox_head.transformer.level_embeds",
        _mmdet_rules(),
        box=r"bbox_head\.reg_branches\.",
        class_copies=r"bbox_head\.cls_branches\.[1-9]\d*\.",
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
