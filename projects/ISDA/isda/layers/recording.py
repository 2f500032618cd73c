"""Whether a graph is being recorded rather than run eagerly."""

from __future__ import annotations

from typing import Sequence

import torch
from detectron2.layers.wrappers import shapes_to_tensor


def recording_graph() -> bool:
    """True under ``torch.jit.trace`` / ``script`` (ONNX export included), ``torch.export`` and
    ``torch.compile``. A Python branch on tensor values, or a read of their values, would then be
    frozen into the graph and be wrong at other inputs, so such eager-only shortcuts check this."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def size_tensor(size: Sequence, device: torch.device) -> torch.Tensor:
    """A map's or image's (h, w), from ``tensor.shape`` -> int64 (2,), symbolic in every recorded
    graph: traced sizes are stacked (Detectron2's ``shapes_to_tensor``), and ``torch.export`` /
    ``torch.compile`` sizes become ``torch.full`` of the symbol (``torch.as_tensor`` would
    specialise them to the example's numbers)."""
    if torch.compiler.is_compiling():
        return torch.stack([torch.full((), s, dtype=torch.int64, device=device) for s in size])
    return shapes_to_tensor(list(size), device).long()
