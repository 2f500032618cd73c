"""Exported artifacts (ONNX, TorchScript, torch.export) run in processes without the project (only
onnxruntime, or only torch and the op library), at sizes other than the export size, and match eager;
the export command verifies, and fails on a tampered artifact; the deployment example runs on a
folder of images with a corrupt one among them."""

import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO, TINY_CONFIG, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from onnx import numpy_helper

from isda.export import ISDAExportModule
from isda.export.attention_impl import NATIVE_OP
from isda.export.formats import FORMATS, pad_canvas, to_blocks
from isda.export.inputs import make_batch
from isda.export.verify import compare_detections, eager_outputs
from isda.layers import op_library_path

EXPORT_SIZE = (128, 160)
RUN_SIZES = [(160, 128), (96, 128), (192, 256)]
# Run in a child process in which importing torch, detectron2 or isda fails.
NO_PROJECT = "import sys\nfor m in ('torch', 'detectron2', 'isda'):\n    sys.modules[m] = None\n"
ORT_RUNNER = NO_PROJECT + """
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
data = np.load(sys.argv[2])
out = {}
for name in data.files:
    if name.endswith("_images"):
        key = name[: -len("_images")]
        feed = {"images": data[name], "image_sizes": data[key + "_sizes"]}
        for i, o in enumerate(session.run(None, feed)):
            out[f"{key}_{i}"] = o
np.savez(sys.argv[3], **out)
"""
# argv: op library, "jit" or "export", artifact, inputs.npz, outputs.npz
TORCH_RUNNER = """
import sys
for m in ('detectron2', 'isda'):
    sys.modules[m] = None
import json
import numpy as np, torch
library, kind, artifact = sys.argv[1:4]
sys.argv = sys.argv[3:]
torch.ops.load_library(library)
if kind == "jit":
    program = torch.jit.load(artifact)
else:
    program = torch.export.load(artifact).module()
# A program exported with --dynamic takes blocks, as its sidecar says.
shape = json.load(open(artifact + ".json"))["inputs"]["images"]["shape"]
block = shape[3] if len(shape) == 6 else None
data = np.load(sys.argv[1])
out = {}
for name in data.files:
    if name.endswith("_images"):
        key = name[: -len("_images")]
        images = torch.from_numpy(data[name])
        if block:  # (B, 3, H, W) canvas, H and W multiples of block
            B, C, H, W = images.shape
            images = images.view(B, C, H // block, block, W // block, block)
        with torch.no_grad():
            res = program(images, torch.from_numpy(data[key + "_sizes"]))
        for i, o in enumerate(res):
            out[f"{key}_{i}"] = o.numpy()
np.savez(sys.argv[2], **out)
"""


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    DetectionCheckpointer(build_model(tiny_cfg()), save_dir=str(folder)).save("tiny")
    return str(folder / "tiny.pth")


@pytest.fixture(scope="module")
def module(weights):
    model = build_model(tiny_cfg()).eval()
    DetectionCheckpointer(model).load(weights)
    return ISDAExportModule(model)


@pytest.fixture(scope="module")
def sample_images(tiny_data_root):
    return sorted(glob.glob(str(tiny_data_root / "**" / "*.png"), recursive=True))[:2]


def export_command(weights, fmt, output, *extra):
    cmd = [
        sys.executable,
        str(REPO / "tools" / "export_model.py"),
        "--config-file",
        str(TINY_CONFIG),
    ]
    cmd += ["--format", fmt, "--output", str(output), "--size", *map(str, EXPORT_SIZE), *extra]
    return subprocess.run(cmd + ["MODEL.WEIGHTS", weights], capture_output=True, text=True)


def exported(weights, tmp_path_factory, fmt, *extra):
    """The folder where the export command wrote a verified artifact of ``fmt``."""
    output = tmp_path_factory.mktemp(fmt)
    proc = export_command(weights, fmt, output, *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return output


@pytest.fixture(scope="module")
def onnx_export(weights, sample_images, tmp_path_factory):
    images = [arg for path in sample_images for arg in ("--sample-image", path)]
    return exported(weights, tmp_path_factory, "onnx", "--dynamic", *images)


@pytest.fixture(scope="module")
def torchscript_export(weights, tmp_path_factory):
    return exported(weights, tmp_path_factory, "torchscript")


@pytest.fixture(scope="module")
def torch_export_static(weights, tmp_path_factory):
    return exported(weights, tmp_path_factory, "torch_export")


def _run_elsewhere(
    script, artifact, module, tmp_path, sizes=RUN_SIZES, batch=2, prefix=(), block=None
):
    """Runs ``artifact`` in a child process (``script`` with ``prefix`` arguments first) on padded
    batches at ``sizes`` (canvases padded further to multiples of ``block`` if given); compares
    with eager on the same canvases."""
    batches = {f"s{h}x{w}": make_batch(module.model, (h, w), [], batch) for h, w in sizes}
    if block:
        batches = {
            k: (pad_canvas(torch.from_numpy(im), block).numpy(), s)
            for k, (im, s) in batches.items()
        }
    inputs = {}
    for key, (images, sizes) in batches.items():
        inputs[key + "_images"], inputs[key + "_sizes"] = images, sizes
    np.savez(tmp_path / "inputs.npz", **inputs)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            *prefix,
            str(artifact),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "out.npz")
    for key, (images, sizes) in batches.items():
        result = compare_detections(
            [got[f"{key}_{i}"] for i in range(4)], eager_outputs(module, images, sizes)
        )
        assert result["passed"], (key, result)


def test_command_writes_a_verified_onnx_model_and_its_sidecar(onnx_export, module):
    sidecar = json.loads((onnx_export / "model.onnx.json").read_text())
    assert sidecar["verification"]["passed"]
    checks = sidecar["verification"]["checks"]
    assert [c["name"] for c in checks] == ["128x160", "160x128", "96x128"]
    assert all(c["input_shape"][0] == 2 and c["min_mask_iou"] >= 0.99 for c in checks)
    assert sidecar["k"] == module.k and len(sidecar["class_names"]) == 5
    assert sidecar["channel_order"] == "RGB" and len(sidecar["pixel_mean"]) == 3
    assert "GridSample" in sidecar["op_implementation"]
    graph_ops = {n.op_type for n in onnx.load(str(onnx_export / "model.onnx")).graph.node}
    assert "GridSample" in graph_ops


def test_onnx_model_runs_in_onnxruntime_alone_at_other_sizes(onnx_export, module, tmp_path):
    _run_elsewhere(ORT_RUNNER, onnx_export / "model.onnx", module, tmp_path)


def test_command_fails_on_a_tampered_artifact(onnx_export, weights, tmp_path):
    shutil.copy(onnx_export / "model.onnx", tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    for init in model.graph.initializer:  # every float weight 5% off: a plausible corrupt file
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            init.CopyFrom(numpy_helper.from_array(w * np.float32(1.05), init.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    proc = export_command(weights, "onnx", tmp_path, "--dynamic", "--verify-only")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "VERIFICATION FAILED" in proc.stderr
    assert not json.loads((tmp_path / "model.onnx.json").read_text())["verification"]["passed"]


def test_torchscript_artifact_calls_the_native_operator(torchscript_export):
    sidecar = json.loads((torchscript_export / "model.ts.json").read_text())
    assert sidecar["verification"]["passed"]
    checks = sidecar["verification"]["checks"]
    assert [c["name"] for c in checks] == ["128x160", "160x128", "96x128"]
    assert NATIVE_OP in sidecar["op_implementation"]
    assert sidecar["op_library"]["file"] == Path(op_library_path()).name
    torch.ops.load_library(op_library_path())  # as a deployment does, before loading
    graph = torch.jit.load(str(torchscript_export / "model.ts")).inlined_graph
    assert NATIVE_OP in str(graph) and "grid_sampler" not in str(graph)


def test_torchscript_artifact_runs_with_torch_and_the_op_library_at_other_sizes(
    torchscript_export, module, tmp_path
):
    prefix = (op_library_path(), "jit")
    _run_elsewhere(TORCH_RUNNER, torchscript_export / "model.ts", module, tmp_path, prefix=prefix)


def test_torch_export_program_runs_with_torch_and_the_op_library(
    torch_export_static, module, tmp_path
):
    sidecar = json.loads((torch_export_static / "model.pt2.json").read_text())
    assert sidecar["verification"]["passed"] and NATIVE_OP in sidecar["op_implementation"]
    artifact = torch_export_static / "model.pt2"
    prefix = (op_library_path(), "export")
    _run_elsewhere(TORCH_RUNNER, artifact, module, tmp_path, [EXPORT_SIZE], 1, prefix)
    # A program exported without --dynamic is for its export size only: it refuses another size.
    run = FORMATS["torch_export"].load(str(artifact))
    with pytest.raises(Exception):
        run(*make_batch(module.model, RUN_SIZES[0], [], 1))


def test_torch_export_at_symbolic_sizes_is_right_at_other_sizes(weights, module, tmp_path):
    proc = export_command(weights, "torch_export", tmp_path, "--dynamic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sidecar = json.loads((tmp_path / "model.pt2.json").read_text())
    assert sidecar["verification"]["passed"] and sidecar["dynamic"]
    assert sidecar["inputs"]["images"]["shape"] == ["batch", 3, "height / 64", 64, "width / 64", 64]
    # 160x128, 96x128 and 192x256 images, on canvases of 192x128, 128x128 and 192x256.
    prefix = (op_library_path(), "export")
    _run_elsewhere(TORCH_RUNNER, tmp_path / "model.pt2", module, tmp_path, prefix=prefix, block=64)


def test_blocks_are_a_view_of_the_canvas_padded_to_the_block():
    images = torch.randn(2, 3, 160, 128)
    canvas = pad_canvas(images, 64)
    assert canvas.shape == (2, 3, 192, 128) and torch.equal(canvas[:, :, :160], images)
    assert not canvas[:, :, 160:].any()  # zero padding, as the model's own
    blocks = to_blocks(canvas, 64)
    assert blocks.shape == (2, 3, 3, 64, 2, 64) and blocks.data_ptr() == canvas.data_ptr()
    assert torch.equal(blocks.reshape(2, 3, 192, 128), canvas)
    with pytest.raises(ValueError, match="multiples of 64.*160x128.*pad_canvas"):
        to_blocks(images, 64)


def test_deploy_example_names_and_skips_a_corrupt_image(onnx_export, sample_images, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for p in sample_images:
        shutil.copy(p, images)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    script = (
        NO_PROJECT
        + "import runpy\nsys.argv = sys.argv[1:]\n"
        + "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    deploy = str(REPO / "tools" / "deploy_onnx.py")
    args = ["--model", str(onnx_export / "model.onnx"), "--output", str(tmp_path / "out")]
    args += ["--score-threshold", "0", *sorted(map(str, images.iterdir()))]
    proc = subprocess.run(
        [sys.executable, "-c", script, deploy, *args], capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr  # 1: an image was skipped
    assert f"skipped {images / 'corrupt.jpg'}" in proc.stderr
    report = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert report["skipped"] == [str(images / "corrupt.jpg")]
    assert len(report["images"]) == len(sample_images)
    for path, detections in report["images"].items():
        assert (tmp_path / "out" / (Path(path).stem + ".png")).is_file()
        assert len(detections) == 20 and all(0 <= d["class_id"] < 5 for d in detections)
