"""The vocabulary of a conversion table: rules, deliberate drops and keeps, and a source format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .transforms import RowSelect

__all__ = ["Drop", "Keep", "Rule", "SourceFormat"]


@dataclass(frozen=True)
class Rule:
    """Target key ``target`` is filled from source key ``source`` (after ``transform``, if any).

    Both are :class:`~isda.conversion.templates.Template` texts with the same fields.
    """

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
