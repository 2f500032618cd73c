"""Artifact formats: how each one is written from an :class:`ISDAExportModule` and run again.

* ``onnx``: opset 17; deformable attention as ``GridSample`` and friends, so stock onnxruntime runs
  it with no custom operator.
* ``torchscript``: ``torch.jit.trace``; deformable attention as the registered operator
  ``torch.ops.isda.ms_deform_attn``, so loading needs the op library. The model takes every size
  from its input tensors, so the trace is right at every input size.
* ``torch_export``: ``torch.export``, on the same operator; ``--dynamic`` makes batch, height and
  width symbolic (height and width as multiples of 32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .attention_impl import NATIVE_OP, attention_impl, native_impl
from .module import INPUT_NAMES, OUTPUT_NAMES, ISDAExportModule

ONNX_OPSET = 17
# Bounds of the torch.export symbolic sizes: height and width are 2..MAX_SIDE multiples of the
# model's size divisibility (a size of one multiple would be specialised by torch.export).
MAX_BATCH, MAX_SIDE = 64, 8192
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


def dynamic_export_refusal() -> Optional[str]:
    """Why ``torch.export`` cannot export ISDA at symbolic sizes with this torch, or None."""
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):
        return (
            f"torch {torch.__version__} cannot export ISDA with symbolic height and width: its "
            "torch.export checks derived dimensions such as 32 * Dim only after tracing, so the "
            "strided convolutions' size arithmetic (e.g. (H - 1) // 8 + 1) is traced without "
            "knowing that H is a multiple of 32 and cannot be proven for all sizes. Export "
            "without --dynamic (a program for the export size only, rejecting other sizes), or "
            "use --format torchscript (the same native operator, right at every size)"
        )
    return None


def _export_torch_export(module, inputs, path, dynamic):
    shapes = None
    if dynamic:
        refusal = dynamic_export_refusal()
        if refusal:
            raise RuntimeError(refusal)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        # The graph's size arithmetic (strided convolutions, x2 upsamplings) holds for multiples
        # of size_divisibility only: H = d * h, W = d * w.
        d = module.model.size_divisibility
        h = torch.export.Dim("h", min=2, max=MAX_SIDE // d)
        w = torch.export.Dim("w", min=2, max=MAX_SIDE // d)
        shapes = {
            "images": {0: batch, 2: d * h, 3: d * w},
            "image_sizes": {0: batch},
        }
    with torch.no_grad(), attention_impl(module, native_impl(inputs[0].device)):
        program = torch.export.export(module, tuple(inputs), dynamic_shapes=shapes)
    torch.export.save(program, path)


def _load_torch_export(path) -> Runner:
    native_impl(torch.device("cpu"))  # loads the op library the program calls
    return _torch_runner(torch.export.load(path).module())


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
