"""Whether a graph is being recorded rather than run eagerly."""

from __future__ import annotations

import torch


def recording_graph() -> bool:
    """True under ``torch.jit.trace`` / ``script`` (ONNX export included), ``torch.export`` and
    ``torch.compile``. A Python branch on tensor values, or a read of their values, would then be
    frozen into the graph and be wrong at other inputs, so such eager-only shortcuts check this."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
