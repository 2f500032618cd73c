"""What a conversion did, key by key, and its human-readable form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

__all__ = ["ConversionReport"]

Shape = Tuple[int, ...]


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
