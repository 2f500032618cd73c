"""Artifact formats: how each one is written from an :class:`ISDAExportModule` and run again.

* ``onnx``: opset 17; deformable attention as ``GridSample`` and friends, so stock onnxruntime runs
  it with no custom operator. Written by torch's TorchScript-based exporter (``dynamo=False`` where
  torch has the switch, 2.5 on): the reference attention reads each level's size from the
  ``spatial_shapes`` tensor, which a trace records as data flow, while ``torch.export`` (under the
  default exporter of torch >= 2.9) makes such values unbacked symbols and fails on the ``narrow``
  of each level (docs/DEPLOYMENT.md).
* ``torchscript``: ``torch.jit.trace``; deformable attention as the registered operator
  ``torch.ops.isda.ms_deform_attn``, so loading needs the op library. The model takes every size
  from its input tensors, so the trace is right at every input size.
* ``torch_export``: ``torch.export``, on the same operator. Without ``--dynamic`` the program is
  for the export size only (and rejects others). With ``--dynamic`` batch, height and width are
  symbolic, and the program takes the batch as blocks (:func:`to_blocks`): a
  ``(B, 3, H / b, b, W / b, b)`` view of a canvas padded to multiples of the model's coarsest
  stride b (64), not of size_divisibility (32). Its height is then ``b * h`` exactly, so every
  level's size is a product of symbols without floor division, which torch.export (2.3
  included) can prove right at every size. The extra padding is part of the input, like any
  padding: GroupNorm statistics include the padded area, so results equal eager PyTorch on the
  same canvas, and move a little against a canvas padded to 32.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .attention_impl import NATIVE_OP, attention_impl, native_impl
from .module import INPUT_NAMES, OUTPUT_NAMES, ISDAExportModule

ONNX_OPSET = 17
# Bounds of the torch.export symbolic sizes: a batch of 1..MAX_BATCH (while tracing, torch picks
# each convolution's backend, and with it the output layout, by testing batch < 16), height and
# width up to MAX_SIDE pixels.
MAX_BATCH, MAX_SIDE = 15, 8192
# Names of the symbolic axes (ONNX dynamic axes).
_AXES = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"}}
_OUT_AXES = {"masks": {0: "batch", 2: "height", 3: "width"}}

Runner = Callable[[np.ndarray, np.ndarray], List[np.ndarray]]


@dataclass(frozen=True)
class ArtifactFormat:
    name: str
    filename: str  # the artifact's file name inside the output folder
    op_implementation: str  # how the deformable attention is expressed in the artifact
    export: Callable[[ISDAExportModule, Sequence[torch.Tensor], str, bool], None]
    load: Callable[[str], Runner]
    runtime: str  # what a deployment needs to run the artifact
    needs_op_library: bool  # whether the artifact calls the native operator of isda._C


def _legacy_exporter() -> Dict[str, bool]:
    """The keyword that selects the TorchScript-based ONNX exporter on torches that have a choice."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def _export_onnx(module, inputs, path, dynamic):
    axes = {**_AXES, **{n: {0: "batch"} for n in OUTPUT_NAMES}, **_OUT_AXES}
    with torch.no_grad(), attention_impl(module, "reference"):
        torch.onnx.export(
            module,
            tuple(inputs),
            path,
            opset_version=ONNX_OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes if dynamic else None,
            **_legacy_exporter(),
        )


def _load_onnx(path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(images, image_sizes):
        return session.run(list(OUTPUT_NAMES), {"images": images, "image_sizes": image_sizes})

    return run


def _export_torchscript(module, inputs, path, dynamic):
    # A traced graph takes every size from its inputs (the model is written for that), so it is
    # size-generic whether or not --dynamic is given.
    with torch.no_grad(), attention_impl(module, native_impl(inputs[0].device)):
        traced = torch.jit.trace(module, tuple(inputs), check_trace=False)
    if NATIVE_OP not in str(traced.inlined_graph):
        raise RuntimeError(f"the traced graph does not call {NATIVE_OP}; nothing was written")
    traced.save(path)


def _torch_runner(program) -> Runner:
    def run(images, image_sizes):
        with torch.no_grad():
            out = program(torch.from_numpy(images), torch.from_numpy(image_sizes))
        return [t.numpy() for t in out]

    return run


def _load_torchscript(path) -> Runner:
    native_impl(torch.device("cpu"))  # loads the op library the graph calls
    return _torch_runner(torch.jit.load(path, map_location="cpu"))


def block_size(model: nn.Module) -> int:
    """The coarsest stride of ``model``'s maps (64 for ISDA's P6): the unit of a blocked canvas."""
    return max(spec.stride for spec in model.neck.output_shape().values())


def pad_canvas(images: torch.Tensor, block: int) -> torch.Tensor:
    """(B, 3, H, W) -> the canvas zero-padded at the bottom/right (the model's own padding value)
    to multiples of ``block``. The image sizes do not change."""
    H, W = images.shape[-2:]
    return torch.nn.functional.pad(images, (0, -W % block, 0, -H % block))


def to_blocks(images: torch.Tensor, block: int) -> torch.Tensor:
    """(B, 3, H, W), H and W multiples of ``block`` -> the (B, 3, H / block, block, W / block,
    block) view that a program exported with --dynamic takes."""
    B, C, H, W = images.shape
    if H % block or W % block:
        raise ValueError(
            f"a torch.export program exported with --dynamic takes canvases padded to multiples "
            f"of {block}; got {H}x{W} (pad it with isda.export.formats.pad_canvas)"
        )
    return images.view(B, C, H // block, block, W // block, block)


class BlockedInput(nn.Module):
    """``forward(blocks, image_sizes)``: the export module on the canvas that ``blocks`` views."""

    def __init__(self, module: ISDAExportModule):
        super().__init__()
        self.module = module

    def forward(self, blocks: torch.Tensor, image_sizes: torch.Tensor):
        B, C, h, block_h, w, block_w = blocks.shape
        return self.module(blocks.reshape(B, C, h * block_h, w * block_w), image_sizes)


def _export_torch_export(module, inputs, path, dynamic):
    images, image_sizes = inputs
    with torch.no_grad(), attention_impl(module, native_impl(images.device)):
        if not dynamic:
            program = torch.export.export(module, (images, image_sizes))
        else:
            block = block_size(module.model)
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            h = torch.export.Dim("h", min=1, max=MAX_SIDE // block)
            w = torch.export.Dim("w", min=1, max=MAX_SIDE // block)
            shapes = {"blocks": {0: batch, 2: h, 4: w}, "image_sizes": {0: batch}}
            blocks = to_blocks(pad_canvas(images, block), block)
            program = torch.export.export(
                BlockedInput(module), (blocks, image_sizes), dynamic_shapes=shapes
            )
    torch.export.save(program, path)


def takes_blocks(format_name: str, dynamic: bool) -> bool:
    """Whether the artifact takes its images as :func:`to_blocks` blocks."""
    return format_name == "torch_export" and dynamic


def _program_block(program) -> Optional[int]:
    """The block size of a program that takes blocks (the --dynamic form), None for (B, 3, H, W)."""
    images = program.graph_signature.user_inputs[0]
    shape = next(n for n in program.graph.nodes if n.name == images).meta["val"].shape
    return int(shape[3]) if len(shape) == 6 else None


def _load_torch_export(path) -> Runner:
    native_impl(torch.device("cpu"))  # loads the op library the program calls
    program = torch.export.load(path)
    block = _program_block(program)
    run = _torch_runner(program.module())
    if block is None:
        return run

    def run_blocks(images, image_sizes):
        return run(to_blocks(torch.from_numpy(images), block).numpy(), image_sizes)

    return run_blocks


FORMATS: Dict[str, ArtifactFormat] = {
    f.name: f
    for f in (
        ArtifactFormat(
            "onnx",
            "model.onnx",
            f"standard ONNX operators (GridSample), opset {ONNX_OPSET}",
            _export_onnx,
            _load_onnx,
            "onnxruntime (no torch, no custom operator)",
            False,
        ),
        ArtifactFormat(
            "torchscript",
            "model.ts",
            f"registered operator {NATIVE_OP} (native kernel)",
            _export_torchscript,
            _load_torchscript,
            "torch and the op library: torch.ops.load_library(<op library>), then "
            "torch.jit.load",
            True,
        ),
        ArtifactFormat(
            "torch_export",
            "model.pt2",
            f"registered operator {NATIVE_OP} (native kernel)",
            _export_torch_export,
            _load_torch_export,
            "torch and the op library: torch.ops.load_library(<op library>), then "
            "torch.export.load",
            True,
        ),
    )
}
