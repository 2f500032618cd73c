"""Pictures of ground truth and predictions that a person reads at a glance.

Detectron2's ``Visualizer`` renders labels at a size derived from the image size, so on small
images (the synthetic scenes are 128-160 px) class names come out a few pixels high. Here the
image is upscaled first, labels get a fixed legible size, and every instance is drawn in the colour
of its class (``metadata.thing_colors``, else Detectron2's colormap), in the ground truth and in the
predictions alike. Predictions carry their class name and score, their box and their mask contour.

Each drawing also returns the label texts it drew (recorded in ``draw_text``, the call that puts
them on the canvas), so callers and tests can check what a picture says without reading pixels.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer

__all__ = [
    "class_colors",
    "display_zoom",
    "draw_ground_truth",
    "draw_predictions",
    "prediction_label",
    "side_by_side",
]

DISPLAY_MIN_SIDE = 480  # small images are upscaled until their short side reaches this (px)
LABEL_FONT_SIZE = 15  # Visualizer font size of a large object's label, in points at 100 dpi
MASK_ALPHA = 0.35  # mask fill opacity: the object stays visible under its colour
TITLE_HEIGHT = 40  # px of the title bar above each panel


def display_zoom(height: int, width: int, min_side: int = DISPLAY_MIN_SIDE) -> int:
    """Integer upscaling factor that brings the short side to at least ``min_side`` (1 if it is)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def class_colors(metadata, num_classes: int) -> List[Tuple[float, float, float]]:
    """One RGB colour in [0, 1] per contiguous class id: the dataset's ``thing_colors`` when it
    names one per class, else Detectron2's colormap (so every dataset gets stable colours)."""
    colors = metadata.get("thing_colors", None)
    if colors is None or len(colors) < num_classes:
        palette = colormap(rgb=True, maximum=1)
        return [tuple(float(v) for v in palette[c % len(palette)]) for c in range(num_classes)]
    return [tuple(v / 255.0 for v in colors[c]) for c in range(num_classes)]


def prediction_label(class_name: str, score: float) -> str:
    """The text drawn next to a prediction, e.g. ``"star 87%"``."""
    return f"{class_name} {score * 100:.0f}%"


class _LabelRecordingVisualizer(Visualizer):
    """A Visualizer with a fixed label size that records the text of every label it draws."""

    def __init__(self, img_rgb: np.ndarray, metadata):
        super().__init__(img_rgb, metadata, scale=1.0)
        # The default size shrinks with the image; a fixed floor keeps labels legible.
        self._default_font_size = max(LABEL_FONT_SIZE, self._default_font_size)
        self.drawn_labels: List[str] = []

    def draw_text(self, text, position, **kwargs):
        self.drawn_labels.append(text)
        return super().draw_text(text, position, **kwargs)


def _upscale_masks(masks: np.ndarray, zoom: int) -> np.ndarray:
    """(N, H, W) bool -> (N, zH, zW) bool; linear interpolation keeps the contours smooth."""
    if zoom == 1 or len(masks) == 0:
        return masks.astype(bool)
    h, w = masks.shape[1:]
    size = (w * zoom, h * zoom)
    return np.stack(
        [
            cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) >= 0.5
            for m in masks
        ]
    )


def _draw(
    image_rgb: np.ndarray,
    metadata,
    classes: Sequence[int],
    masks: np.ndarray,
    boxes: np.ndarray,
    scores: Optional[Sequence[float]],
) -> Tuple[np.ndarray, List[str]]:
    """Upscales the image and draws the instances in their class colours.

    Args:
        image_rgb: (H, W, 3) uint8 RGB.
        classes: N contiguous class ids; masks: (N, H, W) bool; boxes: (N, 4) XYXY in pixels.
        scores: N scores in [0, 1] (predictions), or None (ground truth: class names only).
    Returns:
        the (zH, zW, 3) uint8 RGB drawing and the label texts drawn on it.
    """
    h, w = image_rgb.shape[:2]
    zoom = display_zoom(h, w)
    big = cv2.resize(image_rgb, (w * zoom, h * zoom), interpolation=cv2.INTER_LINEAR)
    names = metadata.get("thing_classes", None)
    classes = [int(c) for c in classes]
    names = names or [str(c) for c in range(max(classes, default=-1) + 1)]
    if scores is None:
        labels = [names[c] for c in classes]
    else:
        labels = [prediction_label(names[c], float(s)) for c, s in zip(classes, scores)]
    palette = class_colors(metadata, len(names))
    colors = [palette[c] for c in classes]
    vis = _LabelRecordingVisualizer(big, metadata)
    # Masks one by one: draw_binary_mask keeps a ring's hole open, which overlay_instances' polygon
    # fill does not. Largest first, so that small masks stay on top.
    big_masks = _upscale_masks(np.asarray(masks), zoom)
    for i in sorted(range(len(classes)), key=lambda i: -int(big_masks[i].sum())):
        vis.draw_binary_mask(big_masks[i], color=colors[i], edge_color=colors[i], alpha=MASK_ALPHA)
    if classes:
        vis.overlay_instances(
            boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * zoom,
            labels=labels,
            assigned_colors=colors,
        )
    return vis.output.get_image(), vis.drawn_labels


def draw_ground_truth(
    image_rgb: np.ndarray, record: Dict, metadata
) -> Tuple[np.ndarray, List[str]]:
    """Draws a Detectron2 dataset dict's annotations (polygons or RLE) with their class names.

    ``record["annotations"]`` must hold contiguous ``category_id`` values, as the dataset
    catalog's dicts do. Returns the upscaled RGB drawing and the labels drawn.
    """
    annos = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    gt = annotations_to_instances(annos, image_rgb.shape[:2], mask_format="bitmask")
    masks = gt.gt_masks.tensor.numpy() if annos else np.zeros((0,) + image_rgb.shape[:2], bool)
    return _draw(
        image_rgb, metadata, gt.gt_classes.tolist(), masks, gt.gt_boxes.tensor.numpy(), None
    )


def draw_predictions(image_rgb: np.ndarray, instances, metadata) -> Tuple[np.ndarray, List[str]]:
    """Draws predicted ``Instances`` (pred_classes, scores, pred_masks, pred_boxes; on the CPU) with
    class name and score. Returns the upscaled RGB drawing and the labels drawn."""
    return _draw(
        image_rgb,
        metadata,
        instances.pred_classes.tolist(),
        instances.pred_masks.numpy(),
        instances.pred_boxes.tensor.numpy(),
        instances.scores.tolist(),
    )


def _title_bar(text: str, width: int) -> np.ndarray:
    bar = np.full((TITLE_HEIGHT, width, 3), 255, dtype=np.uint8)
    cv2.putText(bar, text, (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2, cv2.LINE_AA)
    return bar


def _legend(metadata, width: int) -> np.ndarray:
    """A strip naming each class in its drawing colour."""
    names = metadata.get("thing_classes", None) or []
    bar = np.full((TITLE_HEIGHT, width, 3), 255, dtype=np.uint8)
    x = 8
    for name, color in zip(names, class_colors(metadata, len(names))):
        rgb = tuple(int(round(255 * v)) for v in color)
        cv2.rectangle(bar, (x, 10), (x + 20, 30), rgb, thickness=-1)
        cv2.putText(
            bar, name, (x + 26, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2, cv2.LINE_AA
        )
        x += 40 + 14 * len(name)
    return bar


def side_by_side(panels: Sequence[Tuple[str, np.ndarray]], metadata) -> np.ndarray:
    """Titled RGB panels of equal height, left to right, above a legend of the class colours."""
    gap = np.full((panels[0][1].shape[0] + TITLE_HEIGHT, 12, 3), 255, dtype=np.uint8)
    columns = []
    for i, (title, image) in enumerate(panels):
        if i:
            columns.append(gap)
        columns.append(np.concatenate([_title_bar(title, image.shape[1]), image], axis=0))
    row = np.concatenate(columns, axis=1)
    return np.concatenate([row, _legend(metadata, row.shape[1])], axis=0)
