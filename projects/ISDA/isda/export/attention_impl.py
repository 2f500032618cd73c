"""Which deformable-attention implementation an exported graph records, and what a deployment then
has to ship.

ONNX records the pure-PyTorch reference (``grid_sample``, i.e. ONNX ``GridSample``); TorchScript and
torch.export record the registered operator ``torch.ops.isda.ms_deform_attn`` of the op library
``isda._C``. The choice goes through the layers' own switch (``MSDeformAttn.impl``), so the export
runs the very code that eager inference runs.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator

import torch
from torch import nn

from ..layers import MSDeformAttn, msda_native, op_library_path
from ..layers.msda_dispatch import resolve_impl

# The name under which the op appears in a TorchScript graph.
NATIVE_OP = msda_native.OPERATOR


@contextlib.contextmanager
def attention_impl(module: nn.Module, impl: str) -> Iterator[None]:
    """Within the block, every :class:`MSDeformAttn` in ``module`` runs ``impl`` ("reference",
    "cpu" or "cuda"); each one's previous choice is restored on exit."""
    layers = [m for m in module.modules() if isinstance(m, MSDeformAttn)]
    previous = [m.impl for m in layers]
    for m in layers:
        m.impl = impl
    try:
        yield
    finally:
        for m, old in zip(layers, previous):
            m.impl = old


def native_impl(device: torch.device) -> str:
    """The native implementation for tensors on ``device``; raises, naming the format options,
    when the op library does not provide it (an artifact must never fall back silently)."""
    try:
        return resolve_impl(device.type, device)
    except (RuntimeError, ValueError) as err:
        raise RuntimeError(
            f"TorchScript and torch.export artifacts record the native operator {NATIVE_OP}, "
            f"which is not available here ({err}); build isda._C or use --format onnx"
        ) from err


def op_library() -> Dict[str, str]:
    """What a process without ``isda`` needs to run an artifact that records the native op."""
    path = op_library_path()
    return {
        "operator": NATIVE_OP,
        "file": os.path.basename(path),
        "built_path": path,
        "built_for_torch": torch.__version__,
        "load": f"torch.ops.load_library({os.path.basename(path)!r}) before loading the artifact",
    }
