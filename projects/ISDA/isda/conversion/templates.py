"""Dotted key templates with named fields: the pattern language of the conversion tables."""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

__all__ = ["Template"]

_FIELD = re.compile(r"\{(\w+)([+-]\d+)?\}")


class Template:
    """A dotted key pattern with named fields, e.g. ``backbone.res{s+1}.{b}.conv{c}.weight``.

    A field matches one name component (no dots). ``{s+1}`` means: the key holds ``s + 1`` where the
    rule's canonical value is ``s``, so one rule serves both directions (``res{s+1}`` <->
    ``layer{s}`` is how stage indices are shifted).
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
