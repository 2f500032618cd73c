"""Artifact formats: how each one is written from an :class:`ISDAExportModule` and run again.

* ``onnx``: opset 17; deformable attention as ``GridSample`` and friends, so stock onnxruntime runs
  it with no custom operator.
* ``torchscript``: ``torch.jit.trace``; deformable attention in the same standard operators, so
  ``torch.jit.load`` needs nothing beyond torch.
* ``torch_export``: ``torch.export``; needs the deformable attention as a registered operator
  (``torch.ops.isda.ms_deform_attn``), and the op library at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from .attention import traceable_attention
from .module import INPUT_NAMES, OUTPUT_NAMES, ISDAExportModule

ONNX_OPSET = 17
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


def _export_onnx(module, inputs, path, dynamic):
    axes = {**_AXES, **{n: {0: "batch"} for n in OUTPUT_NAMES}, **_OUT_AXES}
    with torch.no_grad(), traceable_attention():
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
    with torch.no_grad(), traceable_attention():
        traced = torch.jit.trace(module, tuple(inputs), check_trace=False)
    traced.save(path)


def _torch_runner(program) -> Runner:
    def run(images, image_sizes):
        with torch.no_grad():
            out = program(torch.from_numpy(images), torch.from_numpy(image_sizes))
        return [t.numpy() for t in out]

    return run


def _load_torchscript(path) -> Runner:
    return _torch_runner(torch.jit.load(path, map_location="cpu"))


def registered_op_available() -> bool:
    """Whether ``torch.ops.isda.ms_deform_attn`` exists (the op library registers it on load)."""
    from ..layers import ms_deform_attn_func

    ms_deform_attn_func._load_extension()
    try:
        torch.ops.isda.ms_deform_attn
    except (AttributeError, RuntimeError):
        return False
    return True


def _export_torch_export(module, inputs, path, dynamic):
    if not registered_op_available():
        raise RuntimeError(
            "--format torch_export needs the deformable attention as the registered operator "
            "torch.ops.isda.ms_deform_attn, which this build of isda._C does not provide; "
            "use --format torchscript or --format onnx"
        )
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch")
        height, width = torch.export.Dim("height"), torch.export.Dim("width")
        shapes = {"images": {0: batch, 2: height, 3: width}, "image_sizes": {0: batch}}
    with torch.no_grad():
        program = torch.export.export(module, tuple(inputs), dynamic_shapes=shapes)
    torch.export.save(program, path)


def _load_torch_export(path) -> Runner:
    registered_op_available()  # loads the op library so the program's operator resolves
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
        ),
        ArtifactFormat(
            "torchscript",
            "model.ts",
            "standard PyTorch operators (grid_sample)",
            _export_torchscript,
            _load_torchscript,
            "torch (torch.jit.load)",
        ),
        ArtifactFormat(
            "torch_export",
            "model.pt2",
            "registered operator torch.ops.isda.ms_deform_attn (native kernel)",
            _export_torch_export,
            _load_torch_export,
            "torch and the op library: torch.ops.load_library(<path of isda/_C*.so>)",
        ),
    )
}
