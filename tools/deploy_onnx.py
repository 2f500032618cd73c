#!/usr/bin/env python
"""Run an exported ISDA ONNX model on image files with onnxruntime, numpy and OpenCV only.

Reads MODEL.onnx and its sidecar MODEL.onnx.json (written by tools/export_model.py), and for every
image writes OUT/<name>.png (the detections drawn over the image) and one OUT/detections.json.
Pre-processing follows the sidecar: channel order, shortest-edge resize, pixel mean/std and padding.
The model returns its k best detections with no threshold; --score-threshold drops the rest here.
An unreadable image is named on stderr and skipped; the exit status is 1 when any was skipped.

Example:
    python tools/deploy_onnx.py --model export/onnx/model.onnx --output out images/*.jpg
This file is self-contained: copy it into a service as it is.
"""

import argparse
import json
import os
import sys

import cv2
import numpy as np
import onnxruntime

ALPHA = 0.5  # mask opacity in the overlay


def load_model(path):
    with open(path + ".json") as f:
        meta = json.load(f)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session, meta


def resize_shortest_edge(image, min_size, max_size):
    """HWC image -> (resized image, scale), as Detectron2's ResizeShortestEdge at test time."""
    h, w = image.shape[:2]
    scale = min_size / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR), (new_h / h, new_w / w)


def preprocess(image_bgr, meta):
    """BGR uint8 HWC -> images (1, 3, H, W) float32, image_sizes (1, 2) int64, (sy, sx) scale."""
    image = image_bgr[:, :, ::-1] if meta["channel_order"] == "RGB" else image_bgr
    resize = meta["resize_shortest_edge"]
    image, scale = resize_shortest_edge(image, resize["min_size"], resize["max_size"])
    mean = np.asarray(meta["pixel_mean"], np.float32)
    std = np.asarray(meta["pixel_std"], np.float32)
    chw = ((image.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    h, w = chw.shape[1:]
    if meta["dynamic"]:
        d = meta["size_divisibility"]
        H, W = -(-h // d) * d, -(-w // d) * d
    else:  # a fixed-size graph: the resized image must fit into its canvas
        H, W = meta["export_size"]
        if h > H or w > W:
            raise ValueError(f"resized to {h}x{w}, larger than the model's fixed input {H}x{W}")
    canvas = np.zeros((1, 3, H, W), np.float32)
    canvas[0, :, :h, :w] = chw
    return canvas, np.array([[h, w]], np.int64), scale


def postprocess(outputs, image_size, original_hw, scale, score_threshold):
    """One image's outputs -> list of (score, class, mask at original size, box in original px)."""
    scores, classes, masks, boxes = (o[0] for o in outputs)
    h, w = image_size
    sy, sx = scale
    keep = scores >= score_threshold
    detections = []
    for score, cls, mask, box in zip(scores[keep], classes[keep], masks[keep], boxes[keep]):
        mask = cv2.resize(
            mask[:h, :w].astype(np.uint8),
            (original_hw[1], original_hw[0]),
            interpolation=cv2.INTER_NEAREST,
        ).astype(bool)
        box = box / np.array([sx, sy, sx, sy], np.float32)
        detections.append((float(score), int(cls), mask, box))
    return detections


def draw(image_bgr, detections, class_names):
    canvas = image_bgr.copy()
    rng = np.random.default_rng(0)
    colors = rng.integers(64, 256, size=(len(class_names), 3))
    for score, cls, mask, box in detections:
        color = colors[cls].astype(np.float32)
        canvas[mask] = ((1 - ALPHA) * canvas[mask] + ALPHA * color).astype(np.uint8)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color.tolist(), 1)
        label = f"{class_names[cls]} {score:.2f}"
        cv2.putText(
            canvas, label, (x0, max(y0 - 2, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color.tolist(), 1
        )
    return canvas


def run_image(path, session, meta, args):
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a readable image")
    images, image_sizes, scale = preprocess(image, meta)
    outputs = session.run(
        ["scores", "classes", "masks", "boxes"], {"images": images, "image_sizes": image_sizes}
    )
    detections = postprocess(outputs, image_sizes[0], image.shape[:2], scale, args.score_threshold)
    stem = os.path.splitext(os.path.basename(path))[0]
    cv2.imwrite(
        os.path.join(args.output, stem + ".png"), draw(image, detections, meta["class_names"])
    )
    return [
        {
            "class_id": cls,
            "class_name": meta["class_names"][cls],
            "score": score,
            "box_xyxy": [round(float(v), 2) for v in box],
            "mask_area": int(mask.sum()),
        }
        for score, cls, mask, box in detections
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model", required=True, help="the .onnx file; its .json sidecar must be beside it"
    )
    p.add_argument("--output", required=True, help="folder for overlay PNGs and detections.json")
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("images", nargs="+")
    args = p.parse_args(argv)
    session, meta = load_model(args.model)
    os.makedirs(args.output, exist_ok=True)
    results, skipped = {}, []
    for path in args.images:
        try:
            results[path] = run_image(path, session, meta, args)
        except ValueError as err:
            print(f"skipped {path}: {err}", file=sys.stderr)
            skipped.append(path)
    with open(os.path.join(args.output, "detections.json"), "w") as f:
        json.dump({"images": results, "skipped": skipped}, f, indent=2)
    print(f"{len(results)} images -> {args.output} ({len(skipped)} skipped)")
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
