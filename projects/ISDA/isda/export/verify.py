"""Verification of an exported artifact against eager PyTorch, at several input sizes.

An artifact passes when, for every image of every checked batch, it returns the same classes as
eager, scores within ``SCORE_ATOL``, and every detection's mask has IoU >= ``MIN_MASK_IOU`` with the
eager one. Float rounding in a different runtime moves a score by ~1e-7 and flips at most a few
pixels at the mask threshold; anything more is a wrong graph.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .module import OUTPUT_NAMES, ISDAExportModule

SCORE_ATOL = 1e-4
MIN_MASK_IOU = 0.99
DIVISOR = 32


def verification_sizes(height: int, width: int) -> List[Tuple[int, int]]:
    """The export size, the transposed size (other aspect ratio) and a 3/4 size, multiples of 32."""

    def scaled(v: int) -> int:
        return max(DIVISOR, int(round(v * 0.75 / DIVISOR)) * DIVISOR)

    sizes = [(height, width), (width, height), (scaled(height), scaled(width))]
    return list(dict.fromkeys(sizes))  # a square export size has no transposed one


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool (k, H, W) x2 -> (k,) IoU per detection; two empty masks count as equal (1.0)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    inter = np.logical_and(a, b).sum(1)
    union = np.logical_or(a, b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def compare_detections(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> Dict:
    """Outputs (scores, classes, masks, boxes) of an artifact and of eager, for one batch ->
    {"passed", "max_score_diff", "min_mask_iou", "classes_equal"}."""
    g, w = dict(zip(OUTPUT_NAMES, got)), dict(zip(OUTPUT_NAMES, want))
    shapes_equal = all(np.shape(g[n]) == np.shape(w[n]) for n in OUTPUT_NAMES)
    if not shapes_equal:
        return {
            "passed": False,
            "error": f"output shapes {[np.shape(g[n]) for n in OUTPUT_NAMES]} != "
            f"{[np.shape(w[n]) for n in OUTPUT_NAMES]}",
        }
    classes_equal = bool(np.array_equal(g["classes"], w["classes"]))
    score_diff = float(np.abs(g["scores"] - w["scores"]).max(initial=0.0))
    ious = [mask_ious(gm, wm) for gm, wm in zip(g["masks"], w["masks"])]
    min_iou = float(min((i.min(initial=1.0) for i in ious), default=1.0))
    passed = classes_equal and score_diff <= SCORE_ATOL and min_iou >= MIN_MASK_IOU
    return {
        "passed": passed,
        "classes_equal": classes_equal,
        "max_score_diff": score_diff,
        "min_mask_iou": min_iou,
    }


def eager_outputs(module: ISDAExportModule, images, image_sizes) -> List[np.ndarray]:
    with torch.no_grad():
        out = module(torch.as_tensor(images), torch.as_tensor(image_sizes))
    return [t.cpu().numpy() for t in out]


def verify(module: ISDAExportModule, runner, batches) -> Dict:
    """batches: (name, images (B, 3, H, W) float32, image_sizes (B, 2) int64) to check ->
    {"passed", "checks": [per-batch comparison with its name and shape]}."""
    checks = []
    for name, images, image_sizes in batches:
        want = eager_outputs(module, images, image_sizes)
        try:
            got = runner(images, image_sizes)
            result = compare_detections(got, want)
        except Exception as err:  # the runtime rejected the input: report it as a failed check
            result = {"passed": False, "error": f"{type(err).__name__}: {err}"}
        checks.append({"name": name, "input_shape": list(images.shape), **result})
    return {
        "passed": all(c["passed"] for c in checks),
        "score_atol": SCORE_ATOL,
        "min_mask_iou_required": MIN_MASK_IOU,
        "checks": checks,
    }
