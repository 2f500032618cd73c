"""Conversion of public checkpoints into ISDA's Detectron2 state dict.

ISDA's released results start from a COCO-trained Deformable DETR R50 (backbone, neck P3-P6, the
whole deformable transformer, the query embeddings and the class FC; spec §2, §4, §7). This module
maps three source layouts onto ISDA's parameter names:

* ``ddetr``: the original release (fundamentalvision/Deformable-DETR,
  ``r50_deformable_detr-checkpoint.pth``), state dict under ``"model"``;
* ``mmdet``: MMDetection 2.x ``deformable_detr_r50_16x2_50e_coco`` (the checkpoint the authors
  used), state dict under ``"state_dict"``;
* ``torchvision``: an ImageNet ``resnet50`` file from torchvision (backbone only).

The layouts are data: each format is a list of :class:`Rule` (a source template, a target template
and an optional value transform) plus lists of source keys that are dropped on purpose and target
keys that are left at their initialisation on purpose. Templates hold fields such as ``{i}`` that
match one dotted name component; a numeric field may carry an offset (``res{s+1}`` <->
``layer{s}``), which is how layer indices are expanded. Matching goes from the *target* model to the
source, so every target key is either loaded, deliberately new, or an error; every source key is
either used, deliberately dropped, or an error. Nothing is loaded silently in part.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

Shape = Tuple[int, ...]

# ------------------------------------------------------------------------------------------------
# Templates
# ------------------------------------------------------------------------------------------------

_FIELD = re.compile(r"\{(\w+)([+-]\d+)?\}")


class Template:
    """A dotted key pattern with named fields, e.g. ``backbone.res{s+1}.{b}.conv{c}.weight``.

    A field matches one name component (no dots). ``{s+1}`` means: the key holds ``s + 1`` where the
    rule's canonical value is ``s``, so one rule serves both directions.
    """

    def __init__(self, text: str):
        self.text = text
        self.offsets: Dict[str, int] = {}
        parts, pos = [], 0
        for m in _FIELD.finditer(text):
            parts.append(re.escape(text[pos : m.start()]))
            name, off = m.group(1), int(m.group(2) or 0)
            self.offsets[name] = off
            parts.append(rf"(?P<{name}>[^.]+)")
            pos = m.end()
        parts.append(re.escape(text[pos:]))
        self.regex = re.compile("".join(parts) + r"\Z")

    def match(self, key: str) -> Optional[Dict[str, str]]:
        """Canonical field values of ``key``, or None if it does not fit."""
        m = self.regex.match(key)
        if m is None:
            return None
        values = {}
        for name, raw in m.groupdict().items():
            off = self.offsets[name]
            if off:
                if not raw.isdigit() or int(raw) - off < 0:
                    return None
                raw = str(int(raw) - off)
            values[name] = raw
        return values

    def fill(self, values: Mapping[str, str]) -> str:
        """The key for canonical field ``values``."""

        def repl(m):
            name, off = m.group(1), int(m.group(2) or 0)
            return str(int(values[name]) + off) if off else values[name]

        return _FIELD.sub(repl, self.text)


# ------------------------------------------------------------------------------------------------
# Value transforms
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSelect:
    """Keeps rows ``rows`` (in that order): a class head with more outputs than ISDA's."""

    rows: Tuple[int, ...]
    source_rows: int
    doc: str

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[0] != self.source_rows:
            raise ValueError(f"expected {self.source_rows} rows, got shape {tuple(tensor.shape)}")
        return tensor[list(self.rows)].clone()

    def source_shape(self, target_shape: Shape) -> Shape:
        """The source shape that yields ``target_shape`` (to describe and synthesise sources)."""
        if target_shape[0] != len(self.rows):
            raise ValueError(
                f"{self.doc}: the target has {target_shape[0]} rows, not {len(self.rows)}"
            )
        return (self.source_rows,) + tuple(target_shape[1:])


def coco_thing_ids() -> List[int]:
    """COCO category ids of the 80 thing classes, in Detectron2's contiguous order (sorted by id).

    Detectron2's builtin COCO metadata and ``load_coco_json`` both map sorted ids to 0..79, and so
    does MMDetection's CocoDataset, so contiguous class k means the same category everywhere.
    """
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    ids = sorted(c["id"] for c in COCO_CATEGORIES if c["isthing"])
    if len(ids) != 80:
        raise RuntimeError(f"expected 80 COCO thing ids in detectron2's metadata, got {len(ids)}")
    return ids


# The original Deformable DETR classifies COCO *category ids* directly: 91 logits, index = id (0 and
# the 10 ids COCO never uses, e.g. 12, 26, 29, are dead logits). ISDA class k is COCO id
# thing_ids[k].
COCO91_TO_80 = RowSelect(
    rows=tuple(coco_thing_ids()),
    source_rows=91,
    doc="91 COCO-id logits -> 80 contiguous classes (row k = category id of Detectron2 class k)",
)


# ------------------------------------------------------------------------------------------------
# Rules and formats
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Target key ``target`` is filled from source key ``source`` (after ``transform``, if any)."""

    source: str
    target: str
    transform: Optional[RowSelect] = None


@dataclass(frozen=True)
class Drop:
    """Source keys matching ``pattern`` (a regex) are discarded on purpose, for ``reason``.

    ``lossy`` marks weights that carry information ISDA cannot hold; the report shows their size.
    """

    pattern: str
    reason: str
    lossy: bool = False


@dataclass(frozen=True)
class Keep:
    """Target keys matching ``pattern`` (a regex) keep their init on purpose, for ``reason``."""

    pattern: str
    reason: str


@dataclass
class SourceFormat:
    """One checkpoint layout: where its state dict lives and how its keys map onto ISDA's."""

    name: str
    description: str
    container_key: Optional[str]  # "model", "state_dict", or None for a bare state dict
    signature: str  # a key that identifies the format
    rules: List[Rule]
    drops: List[Drop] = field(default_factory=list)
    keeps: List[Keep] = field(default_factory=list)


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

# What ISDA has and no Deformable DETR has: the P2 lateral (new in ISDA's neck), the MFR head and
# the
# kernel FFN (spec §1, §3, §4). Matching by regex keeps these lists short.
_ISDA_NEW = [
    Keep(r"neck\.lateral\.0\.", "P2 lateral conv: ISDA-only (Deformable DETR uses P3-P6)"),
    Keep(r"mask_feature_head\.", "mask feature head (MFR): ISDA-only"),
    Keep(r"mask_head\.kernel_branches\.", "kernel FFN: ISDA-only (DDETR box FFN differs)"),
]
_BN_COUNTER = Keep(r"num_batches_tracked\Z", "BatchNorm step counter, not a weight")


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
    rules += [
        Rule(f"class_embed.{{k}}.{p}", f"mask_head.class_branches.{{k}}.{p}", COCO91_TO_80)
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
    # (self_attn, norm, ffn, norm). FFN: layers.0 = Sequential(Linear, ReLU, Dropout), layers.1 =
    # Linear.
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


_SHARED_CLS = (
    "copy of class head 0: without box refinement one class FC is shared by all decoder layers "
    "(ISDA: MODEL.ISDA.SHARE_HEADS_ACROSS_LAYERS)"
)
_BACKBONE_ONLY = Keep(
    r"(?!backbone\.)", "not part of an ImageNet ResNet: keeps ISDA's own initialisation"
)

FORMATS: Dict[str, SourceFormat] = {
    "ddetr": SourceFormat(
        name="ddetr",
        description="fundamentalvision/Deformable-DETR r50_deformable_detr-checkpoint.pth",
        container_key="model",
        signature="transformer.level_embed",
        rules=_ddetr_rules(),
        drops=[
            Drop(r"bbox_embed\.", "box regression FFN: ISDA predicts masks, not boxes"),
            Drop(r"class_embed\.[1-9]\d*\.", _SHARED_CLS),
            Drop(
                r"input_proj\.\d+\.0\.bias\Z",
                "conv bias before GroupNorm: ISDA's neck convs have none (mmdet layout); GN does "
                "not cancel a per-channel bias exactly, so this is a small perturbation that "
                "fine-tuning "
                "absorbs",
                lossy=True,
            ),
            Drop(r".*num_batches_tracked\Z", "BatchNorm step counter"),
        ],
        keeps=_ISDA_NEW + [_BN_COUNTER],
    ),
    "mmdet": SourceFormat(
        name="mmdet",
        description="MMDetection 2.x deformable_detr_r50_16x2_50e_coco",
        container_key="state_dict",
        signature="bbox_head.transformer.level_embeds",
        rules=_mmdet_rules(),
        drops=[
            Drop(
                r"bbox_head\.reg_branches\.", "box regression FFN: ISDA predicts masks, not boxes"
            ),
            Drop(r"bbox_head\.cls_branches\.[1-9]\d*\.", _SHARED_CLS),
            Drop(r".*num_batches_tracked\Z", "BatchNorm step counter"),
        ],
        keeps=_ISDA_NEW + [_BN_COUNTER],
    ),
    "torchvision": SourceFormat(
        name="torchvision",
        description="torchvision ImageNet ResNet (e.g. resnet50-0676ba61.pth)",
        container_key=None,
        signature="layer1.0.conv1.weight",
        rules=resnet_rules(""),
        drops=[
            Drop(r"fc\.", "ImageNet classifier"),
            Drop(r".*num_batches_tracked\Z", "BatchNorm step counter"),
        ],
        keeps=[_BACKBONE_ONLY, _BN_COUNTER],
    ),
}


# ------------------------------------------------------------------------------------------------
# Loading sources
# ------------------------------------------------------------------------------------------------


class CheckpointFormatError(RuntimeError):
    """A source file cannot be read, or is not in the expected layout."""


def load_source(path: str, unsafe_pickle: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True``: a checkpoint is data, and unpickling arbitrary
    objects can run code. ``unsafe_pickle`` lifts that for a file the user trusts."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointFormatError(
            f"{path}: torch.load(weights_only=True) refused the file because it pickles objects "
            "that are not tensors or plain containers. The original Deformable DETR release does "
            "this: besides 'model' it stores 'args' (an argparse.Namespace) and optimizer state.\n"
            "Either strip it once on a machine you trust:\n"
            "  python -c \"import torch; c = torch.load('IN.pth', map_location='cpu', "
            "weights_only=False); torch.save({'model': c['model']}, 'OUT.pth')\"\n"
            "or, if you trust the file, re-run with --unsafe-pickle.\n"
            f"torch said: {str(e).strip().splitlines()[0]}"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _strip_module_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # Files saved from DistributedDataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def extract_state_dict(obj: dict, fmt: SourceFormat) -> Dict[str, torch.Tensor]:
    """The tensor dict of ``fmt`` inside a loaded file (bare dicts are accepted for any format)."""
    state = obj.get(fmt.container_key, obj) if fmt.container_key else obj
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"'{fmt.container_key}' is not a dict in this file")
    state = _strip_module_prefix(state)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointFormatError(f"non-tensor entries in the state dict: {bad[:5]}")
    return state


def detect_format(obj: dict) -> SourceFormat:
    """The format whose signature key is in the file."""
    for fmt in FORMATS.values():
        candidate = obj.get(fmt.container_key, obj) if fmt.container_key else obj
        if isinstance(candidate, dict) and fmt.signature in _strip_module_prefix(candidate):
            return fmt
    raise CheckpointFormatError(
        "unknown checkpoint layout; expected one of: "
        + "; ".join(f"{f.name} ({f.description})" for f in FORMATS.values())
    )


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """Everything the conversion did, key by key; ``ok`` is False on anything unexpected."""

    source_format: str
    loaded: List[Tuple[str, str, Shape]] = field(default_factory=list)  # target, source, shape
    kept_init: List[Tuple[str, str]] = field(default_factory=list)  # target, reason
    dropped: List[Tuple[str, str]] = field(default_factory=list)  # source, reason
    missing: List[Tuple[str, str]] = field(default_factory=list)  # target, expected source
    mismatched: List[Tuple[str, str, Shape, Shape]] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)  # source keys no rule or drop explains
    uncovered: List[str] = field(default_factory=list)  # target keys no rule or keep explains

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.unused or self.uncovered)

    def errors(self) -> List[str]:
        """One line per problem."""
        lines = [f"missing source key {s} (for {t})" for t, s in self.missing]
        lines += [
            f"shape mismatch {s} {tuple(ss)} -> {t} {tuple(ts)}" for t, s, ss, ts in self.mismatched
        ]
        lines += [f"source key not mapped by any rule: {s}" for s in self.unused]
        lines += [f"target key not covered by the mapping table: {t}" for t in self.uncovered]
        return lines

    def format(self, full: bool = True) -> str:
        """The human-readable report; ``full=False`` lists only problems and the summary."""
        out = [f"Source format: {self.source_format}"]
        if full:
            out += _section(
                "LOADED target <- source", [f"{t} <- {s} {sh}" for t, s, sh in self.loaded]
            )
            out += _section("LEFT AT INITIALISATION", [f"{t}  ({r})" for t, r in self.kept_init])
            out += _section("DROPPED source keys", [f"{s}  ({r})" for s, r in self.dropped])
        mism = [f"{s} {ss} -> {t} {ts}" for t, s, ss, ts in self.mismatched]
        out += _section("SHAPE MISMATCHES source -> target", mism)
        out += _section("MISSING SOURCE KEYS", [f"{s} (for {t})" for t, s in self.missing])
        out += _section("UNMAPPED SOURCE KEYS", self.unused)
        out += _section("UNCOVERED TARGET KEYS", self.uncovered)
        out.append(
            f"Summary: {len(self.loaded)} loaded, {len(self.kept_init)} left at init, "
            f"{len(self.dropped)} dropped, {len(self.errors())} errors"
        )
        return "\n".join(out)


def _section(title: str, lines: Sequence[str]) -> List[str]:
    return [f"== {title} ({len(lines)})"] + [f"  {line}" for line in lines]


def _first(items, key: str, attr: str):
    for item in items:
        if re.match(getattr(item, attr), key):
            return item
    return None


def _resolve(fmt: SourceFormat, target_key: str) -> Optional[Tuple[Rule, str]]:
    """The first rule that produces ``target_key``, with the source key it needs."""
    for rule in fmt.rules:
        values = Template(rule.target).match(target_key)
        if values is not None:
            return rule, Template(rule.source).fill(values)
    return None


def plan(fmt: SourceFormat, target_shapes: Mapping[str, Shape]) -> Dict[str, Tuple[Rule, str]]:
    """target key -> (rule, source key) for every target key the table covers."""
    resolved = {t: _resolve(fmt, t) for t in target_shapes}
    return {t: r for t, r in resolved.items() if r is not None}


def expected_source_shapes(
    fmt: SourceFormat, target_shapes: Mapping[str, Shape]
) -> Dict[str, Shape]:
    """The source keys and shapes a checkpoint of ``fmt`` must hold to fill ``target_shapes``.

    Dropped keys (box heads, conv biases, duplicates) are not included: they are not derivable from
    the target. Used to document the mapping and to synthesise test checkpoints.
    """
    shapes = {}
    for t, (rule, s) in plan(fmt, target_shapes).items():
        ts = tuple(target_shapes[t])
        shapes[s] = rule.transform.source_shape(ts) if rule.transform else ts
    return shapes


def convert(
    source: Mapping[str, torch.Tensor], fmt: SourceFormat, target_shapes: Mapping[str, Shape]
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Maps ``source`` onto the keys of ``target_shapes``.

    Returns the converted tensors (only target keys that were actually loaded) and the report.
    """
    report = ConversionReport(fmt.name)
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for t, ts in target_shapes.items():
        resolved = _resolve(fmt, t)
        if resolved is None:
            keep = _first(fmt.keeps, t, "pattern")
            if keep is None:
                report.uncovered.append(t)
            else:
                report.kept_init.append((t, keep.reason))
            continue
        rule, s = resolved
        if s not in source:
            report.missing.append((t, s))
            continue
        used.add(s)
        value = _apply(rule, source[s])
        if value is None or tuple(value.shape) != tuple(ts):
            report.mismatched.append((t, s, tuple(source[s].shape), tuple(ts)))
            continue
        out[t] = value
        report.loaded.append((t, s, tuple(source[s].shape)))
    _classify_leftovers(source, fmt, used, report)
    return out, report


def _apply(rule: Rule, tensor: torch.Tensor) -> Optional[torch.Tensor]:
    if rule.transform is None:
        return tensor.detach().clone()
    try:
        return rule.transform.apply(tensor)
    except ValueError:
        return None  # reported as a shape mismatch


def _classify_leftovers(source, fmt: SourceFormat, used: set, report: ConversionReport) -> None:
    for s, v in source.items():
        if s in used:
            continue
        drop = _first(fmt.drops, s, "pattern")
        if drop is None:
            report.unused.append(s)
            continue
        reason = drop.reason
        if drop.lossy and v.numel():
            reason += f"; max |value| = {v.abs().max().item():.3g}"
        report.dropped.append((s, reason))


# ------------------------------------------------------------------------------------------------
# Files and the command line
# ------------------------------------------------------------------------------------------------


def save_converted(path: str, state: Dict[str, torch.Tensor], report: ConversionReport) -> None:
    """Writes a file that ``MODEL.WEIGHTS`` / DetectionCheckpointer loads by exact key names
    (``matching_heuristics`` False, so no name guessing happens at load time)."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {
        "model": state,
        "__author__": f"isda.checkpoint ({report.source_format})",
        "matching_heuristics": False,
    }
    torch.save(payload, path)
    logger.info("Wrote %d tensors to %s", len(state), path)


def target_shapes_from_config(config_file: str, opts: Sequence[str] = ()) -> Dict[str, Shape]:
    """Builds ISDA on CPU from a config and returns its state-dict layout (no weights loaded)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from .config import add_isda_config

    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def add_cli_arguments(parser: argparse.ArgumentParser, formats: Sequence[str]) -> None:
    """The options both conversion scripts share."""
    parser.add_argument("source", help="checkpoint to convert")
    parser.add_argument("output", help="converted .pth for MODEL.WEIGHTS")
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", *formats],
        help="source layout (default: detect)",
    )
    parser.add_argument(
        "--config-file",
        default="configs/Base-ISDA.yaml",
        help="ISDA config that defines the target model (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="write the file even if keys are missing, unmapped or of the wrong shape",
    )
    parser.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="load with weights_only=False (only for files you trust)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary and problems")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")


def run_conversion(
    args: argparse.Namespace, formats: Sequence[str]
) -> Tuple[ConversionReport, bool]:
    """Loads, converts and (unless there are errors and no --allow-partial) writes. Returns the
    report and whether a file was written."""
    obj = load_source(args.source, unsafe_pickle=args.unsafe_pickle)
    fmt = detect_format(obj) if args.format == "auto" else FORMATS[args.format]
    if fmt.name not in formats:
        raise CheckpointFormatError(
            f"{args.source} looks like '{fmt.name}', this tool reads {formats}"
        )
    source = extract_state_dict(obj, fmt)
    target = target_shapes_from_config(args.config_file, args.opts)
    state, report = convert(source, fmt, target)
    if report.ok or args.allow_partial:
        save_converted(args.output, state, report)
        return report, True
    return report, False
