"""Inputs for exporting and verifying: padded, normalised batches at given sizes, from image files
or (without files) from a fixed random generator."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data.detection_utils import read_image

from ..modeling.meta_arch import ISDA
from .module import normalised_batch

# The second image of a batch is this fraction of the canvas, so every batch has padding.
PADDED_FRACTION = 0.75
SEED = 0


def load_images(paths: Sequence[str], image_format: str) -> List[np.ndarray]:
    """Image files -> HWC uint8 arrays in the model's channel order; raises naming a bad file."""
    images = []
    for path in paths:
        try:
            images.append(read_image(path, format=image_format))
        except Exception as err:  # PIL raises several types for unreadable files
            raise ValueError(f"--sample-image {path}: cannot be read as an image ({err})") from err
    return images


def _image_at(
    source: Optional[np.ndarray], h: int, w: int, rng: np.random.Generator
) -> torch.Tensor:
    """(3, h, w) float32 in 0..255: ``source`` resized, or random pixels without a source."""
    if source is None:
        pixels = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
    else:
        pixels = cv2.resize(source, (w, h), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float()


def make_batch(
    model: ISDA, size: Tuple[int, int], sources: Sequence[np.ndarray], batch_size: int
) -> Tuple[np.ndarray, np.ndarray]:
    """-> images (B, 3, H, W) float32 normalised, image_sizes (B, 2) int64. Image 0 fills the
    (H, W) canvas; the others are smaller by PADDED_FRACTION, so they are padded."""
    rng = np.random.default_rng(SEED)
    H, W = size
    tensors = []
    for i in range(batch_size):
        h, w = (H, W) if i == 0 else (int(H * PADDED_FRACTION), int(W * PADDED_FRACTION))
        source = sources[i % len(sources)] if sources else None
        tensors.append(_image_at(source, h, w, rng).to(model.device))
    images, sizes = normalised_batch(model, tensors)
    return images.cpu().numpy(), sizes.cpu().numpy()
