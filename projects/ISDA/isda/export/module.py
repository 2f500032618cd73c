"""The exportable form of an :class:`isda.modeling.meta_arch.ISDA`: plain tensors in and out."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from detectron2.structures import ImageList
from torch import nn

from ..modeling.meta_arch import ISDA
from .detections import detections_from_query_outputs

INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("scores", "classes", "masks", "boxes")


class ISDAExportModule(nn.Module):
    """Wraps a trained ISDA (in eval mode) for tracing and export.

    ``forward(images, image_sizes)``:
        images: (B, 3, H, W) float32, RGB, already normalised with the model's pixel mean/std,
            zero-padded to H, W divisible by 32 (``size_divisibility``).
        image_sizes: (B, 2) int64, the valid (h, w) of each image inside the padded canvas.
    Returns ``(scores, classes, masks, boxes)``: (B, k) float32, (B, k) int64, (B, k, H, W) bool,
    (B, k, 4) float32 XYXY pixels; k = ``MODEL.ISDA.TEST.MAX_PER_IMAGE`` (at most Q * K), in
    the order of their classification score (the maskness rescoring can reorder the final scores,
    as in eager inference), with no score threshold.
    """

    def __init__(self, model: ISDA, k: Optional[int] = None):
        super().__init__()
        self.model = model
        num_pairs = (
            model.query_embedding.num_embeddings * model.mask_head.class_branches[0].out_features
        )
        self.k = min(k or model.test_max_per_image, num_pairs)
        # Inference only. Exporters put a module back into the mode it had, and train() of the
        # wrapper would switch BatchNorm of the model to batch statistics.
        self.eval()

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        logits, kernels, mfr = m.predict(ImageList(images, image_sizes))
        return detections_from_query_outputs(
            logits[-1],
            kernels[-1],
            mfr,
            image_sizes,
            m.mfr_stride,
            self.k,
            mask_threshold=m.test_mask_threshold,
            use_maskness=m.test_maskness,
        )


def normalised_batch(model: ISDA, images) -> Tuple[torch.Tensor, torch.Tensor]:
    """A list of (3, h, w) RGB float tensors in 0..255 -> the module's inputs (images, image_sizes),
    normalised and padded as :meth:`ISDA.preprocess_image` does."""
    batch = model.preprocess_image([{"image": im} for im in images])
    sizes = torch.tensor(batch.image_sizes, dtype=torch.int64, device=batch.tensor.device)
    return batch.tensor, sizes
