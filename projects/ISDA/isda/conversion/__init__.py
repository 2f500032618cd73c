"""Conversion of public checkpoints into ISDA's Detectron2 state dict.

ISDA's released results start from a COCO-trained Deformable DETR R50 (backbone, neck P3-P6, the
whole deformable transformer, the query embeddings and the class FC: the ``load_from`` of the
authors' ``configs/isda/isda_r50_3x_coco.py``). This package maps three source layouts
(:mod:`~isda.conversion.formats`) onto ISDA's parameter names.

The layouts are data: each format is a list of :class:`Rule` (a source template, a target template
and an optional value transform) plus lists of source keys that are dropped on purpose and target
keys that are left at their initialisation on purpose. One file per concept:

* ``templates.py``: the key pattern language (``{i}`` fields, ``{s+1}`` offsets);
* ``transforms.py``: value transforms (the COCO 91 -> 80 class rows);
* ``rules.py`` and ``formats.py``: the table vocabulary and the three tables;
* ``convert.py``: applying a table; ``report.py``: what it did;
* ``files.py``: reading sources and writing results.

The command line is ``tools/convert_deformable_detr.py`` / ``tools/convert_torchvision_resnet.py``.
"""

from .convert import convert, expected_source_shapes
from .files import (
    CheckpointFormatError,
    detect_format,
    extract_state_dict,
    load_source,
    save_converted,
)
from .formats import resnet_rules, source_formats
from .report import ConversionReport
from .rules import Drop, Keep, Rule, SourceFormat
from .templates import Template
from .transforms import RowSelect, coco91_to_80, coco_thing_ids

__all__ = [
    "CheckpointFormatError",
    "ConversionReport",
    "Drop",
    "Keep",
    "RowSelect",
    "Rule",
    "SourceFormat",
    "Template",
    "coco91_to_80",
    "coco_thing_ids",
    "convert",
    "detect_format",
    "expected_source_shapes",
    "extract_state_dict",
    "load_source",
    "resnet_rules",
    "save_converted",
    "source_formats",
]
