"""Deployment speed: ISDA R50 as an ONNX model in onnxruntime (CPU) against eager PyTorch, same run.

    .venv/bin/python benchmarks/bench_export.py [--size 800 1216] [--repeats 3]

Random weights (nothing can be downloaded here); one normalised image of --size. Both run the same
export module (fixed k, masks at the input size): eager with the native CPU deformable-attention
kernel under ``torch.inference_mode``, onnxruntime on the exported graph (GridSample). They
alternate, one image at a time; the table gives the median of --repeats after one warm-up each, and
the ratio onnxruntime / eager.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import onnxruntime
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from isda import add_isda_config
from isda.export import ISDAExportModule
from isda.export.formats import FORMATS
from isda.export.inputs import make_batch

# The sibling script (this folder is on sys.path when a script in it runs).
from bench_ms_deform_attn import describe_machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "COCO-InstanceSegmentation", "isda_R_50_12ep.yaml")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", nargs=2, type=int, default=(800, 1216), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    module = ISDAExportModule(build_model(cfg).eval())
    images, sizes = make_batch(module.model, tuple(args.size), [], 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_s = _seconds(
            lambda: FORMATS["onnx"].export(
                module, (torch.from_numpy(images), torch.from_numpy(sizes)), path, True
            )
        )
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {"images": images, "image_sizes": sizes}
    x, s = torch.from_numpy(images), torch.from_numpy(sizes)

    def eager():
        with torch.inference_mode():
            module(x, s)

    def ort():
        session.run(None, feed)

    times = {"PyTorch eager (native op)": [], "onnxruntime CPU (GridSample)": []}
    runs = dict(zip(times, (eager, ort)))
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(_seconds(fn))
    print(describe_machine())
    print(f"onnxruntime {onnxruntime.__version__}; export took {export_s:.0f} s")
    print(f"ISDA R50 ({CONFIG}), input 1x3x{args.size[0]}x{args.size[1]} float32, k={module.k}")
    print(f"| runtime | median s/image ({args.repeats} repeats) | vs eager |")
    print("|---|---|---|")
    base = statistics.median(times["PyTorch eager (native op)"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
