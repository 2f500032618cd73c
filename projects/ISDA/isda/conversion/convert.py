"""Mapping a source state dict onto ISDA's keys with one :class:`SourceFormat` table.

Matching goes from the *target* model to the source, so every target key is either loaded,
deliberately new, or an error; every source key is either used, deliberately dropped, or an error.
Nothing is loaded silently in part.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

import torch

from .report import ConversionReport
from .rules import Rule, SourceFormat
from .templates import Template

__all__ = ["convert", "expected_source_shapes"]

Shape = Tuple[int, ...]


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


def expected_source_shapes(
    fmt: SourceFormat, target_shapes: Mapping[str, Shape]
) -> Dict[str, Shape]:
    """The source keys and shapes a checkpoint of ``fmt`` must hold to fill ``target_shapes``.

    This is the table read backwards: what a file must contain, e.g. to check a table against a
    published model definition or to write a test file. Dropped keys (box heads, conv biases,
    duplicates) are not included: they are not derivable from the target.
    """
    shapes = {}
    for t, ts in target_shapes.items():
        resolved = _resolve(fmt, t)
        if resolved is not None:
            rule, s = resolved
            shapes[s] = rule.transform.source_shape(tuple(ts)) if rule.transform else tuple(ts)
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
