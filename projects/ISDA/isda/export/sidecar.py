"""The JSON written beside every artifact: what a caller must feed it, what it returns, how it was
made and how it was verified."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Dict, List, Tuple

from .attention_impl import op_library
from .formats import ArtifactFormat, block_size, takes_blocks
from .module import ISDAExportModule

_PACKAGES = ("torch", "onnx", "onnxruntime", "numpy", "opencv-python-headless")


def library_versions() -> Dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    import detectron2

    versions["detectron2"] = detectron2.__version__
    return versions


def _images_input(model, fmt: ArtifactFormat, export_size: Tuple[int, int], dynamic: bool) -> Dict:
    canvas = (
        "(pixel - pixel_mean) / pixel_std in channel_order, zero-padded at the bottom/right to "
        f"multiples of {model.size_divisibility}"
    )
    if takes_blocks(fmt.name, dynamic):
        b = block_size(model)
        return {
            "shape": ["batch", 3, f"height / {b}", b, f"width / {b}", b],
            "dtype": "float32",
            "meaning": f"{canvas}, then to multiples of {b} (isda.export.formats.pad_canvas), "
            f"viewed as blocks: images.view(batch, 3, height // {b}, {b}, width // {b}, {b}) "
            "(isda.export.formats.to_blocks); the masks come back on that canvas",
        }
    return {
        "shape": ["batch", 3, "height", "width"] if dynamic else [1, 3, *export_size],
        "dtype": "float32",
        "meaning": canvas,
    }


def describe(
    cfg,
    module: ISDAExportModule,
    fmt: ArtifactFormat,
    class_names: List[str],
    export_size: Tuple[int, int],
    dynamic: bool,
    verification: Dict,
) -> Dict:
    model = module.model
    return {
        "format": fmt.name,
        "artifact": fmt.filename,
        "runtime": fmt.runtime,
        "op_implementation": fmt.op_implementation,
        # What a deployment must ship and load besides torch (None: nothing).
        "op_library": op_library() if fmt.needs_op_library else None,
        "inputs": {
            "images": _images_input(model, fmt, export_size, dynamic),
            "image_sizes": {
                "shape": ["batch", 2],
                "dtype": "int64",
                "meaning": "valid (height, width) of each image inside the padded canvas",
            },
        },
        "outputs": {
            "scores": {"shape": ["batch", "k"], "dtype": "float32"},
            "classes": {
                "shape": ["batch", "k"],
                "dtype": "int64",
                "meaning": "index in class_names",
            },
            "masks": {
                "shape": ["batch", "k", "height", "width"],
                "dtype": "bool",
                "meaning": "on the padded canvas; crop to image_sizes, resize to the original",
            },
            "boxes": {"shape": ["batch", "k", 4], "dtype": "float32", "meaning": "XYXY pixels"},
            "order": "top-k by classification score, as eager inference; no score threshold is "
            "applied (the caller drops low scores)",
        },
        "k": module.k,
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "channel_order": cfg.INPUT.FORMAT,
        "size_divisibility": model.size_divisibility,
        "resize_shortest_edge": {
            "min_size": cfg.INPUT.MIN_SIZE_TEST,
            "max_size": cfg.INPUT.MAX_SIZE_TEST,
        },
        "class_names": class_names,
        "export_size": list(export_size),
        "dynamic": dynamic,
        "versions": library_versions(),
        "device": str(model.device),
        "verification": verification,
    }
