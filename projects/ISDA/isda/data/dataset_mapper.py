"""Training/test data mapper with the DETR augmentation recipe used by ISDA (released code:
configs/isda/isda_r50_3x_coco.py, `train_pipeline`).

Training: horizontal flip, then one of two policies with equal probability:
  (a) resize the short side to a choice of INPUT.MIN_SIZE_TRAIN (long side <= INPUT.MAX_SIZE_TRAIN);
  (b) resize the short side to a choice of INPUT.ISDA.CROP_PRE_RESIZE (long side <= CROP_PRE_MAX_SIZE),
      random crop (INPUT.CROP), then resize as in (a).
A crop that removes every instance is drawn again (the released code re-samples the image instead).
Test: resize to INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST. Padding to a multiple of 32 happens in the model.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .sample_checks import (
    SkipSample,
    check_image_matches_record,
    read_image_checked,
    validate_annotations,
)

__all__ = ["ISDADatasetMapper"]

CROP_RETRIES = 10
logger = logging.getLogger(__name__)


def build_policies(cfg, is_train: bool) -> List[List[T.Augmentation]]:
    """The augmentation policies; training draws one per image, test has exactly one."""
    if not is_train:
        return [[T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]]
    resize = T.ResizeShortestEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    )
    flip = [T.RandomFlip()] if cfg.INPUT.RANDOM_FLIP != "none" else []
    policies = [flip + [resize]]
    if cfg.INPUT.CROP.ENABLED:
        pre = T.ResizeShortestEdge(
            cfg.INPUT.ISDA.CROP_PRE_RESIZE, cfg.INPUT.ISDA.CROP_PRE_MAX_SIZE, "choice"
        )
        crop = T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE)
        policies.append(flip + [pre, crop, resize])
    return policies


class ISDADatasetMapper:
    """Maps a Detectron2 dataset dict to the model's input: ``image`` (3, H, W) uint8 tensor in
    INPUT.FORMAT and, in training, ``instances`` with gt_classes and gt_masks (BitMasks).

    Bad samples never stop a run (README "Failure behaviour"). In training, an unreadable image
    makes ``__call__`` return None, so Detectron2's MapDataset draws another index; unusable
    annotations are dropped and the image kept. At test time the dict comes back with
    ``SKIP_KEY`` (the reason) and no ``image``; ``isda.engine.SkippedImageFilter`` removes it.
    Each file is warned about once per process, and counts travel to the main process in
    ``ISSUES_KEY`` of the next good sample (``isda.engine.DataIssueCounter`` sums them).
    """

    SKIP_KEY = "isda_skip_reason"
    ISSUES_KEY = "isda_data_issues"

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        policies,
        image_format: str = "RGB",
        mask_format="bitmask",
        num_classes: Optional[int] = None,
        max_aspect_ratio: float = float("inf"),
    ):
        self.is_train, self.policies = is_train, policies
        self.image_format, self.mask_format = image_format, mask_format
        self.num_classes, self.max_aspect_ratio = num_classes, max_aspect_ratio
        self._warned = set()
        self._pending = Counter()

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        policies = build_policies(cfg, is_train)
        return {
            "is_train": is_train,
            "policies": policies,
            "image_format": cfg.INPUT.FORMAT,
            "mask_format": cfg.INPUT.MASK_FORMAT,
            "num_classes": cfg.MODEL.ISDA.NUM_CLASSES,
            "max_aspect_ratio": _max_aspect_ratio(policies),
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict.get("file_name", "<no file_name>")
        try:
            mapped = self._map(dataset_dict)
        except SkipSample as e:
            return self._skip(dataset_dict, file_name, str(e))
        except Exception as e:
            # Not a known data problem, so possibly a bug: stop, but say which file triggered it.
            raise RuntimeError(f"ISDADatasetMapper failed on {file_name}: {e!r}") from e
        if self._pending:
            mapped[self.ISSUES_KEY] = dict(self._pending)
            self._pending.clear()
        return mapped

    def _map(self, dataset_dict):
        image = read_image_checked(dataset_dict["file_name"], self.image_format)
        check_image_matches_record(dataset_dict, image)
        self._check_aspect_ratio(image)
        if not self.is_train:
            image, _ = self._augment(image, self.policies[0])
            dataset_dict.pop("annotations", None)
            dataset_dict["image"] = _to_tensor(image)
            return dataset_dict
        annos = [a for a in dataset_dict.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        annos, dropped = validate_annotations(
            annos, image.shape[:2], self.num_classes, dataset_dict["file_name"]
        )
        if dropped:
            self._pending["dropped_annotations"] += len(dropped)
            self._warn_once(
                dataset_dict["file_name"],
                f"dropped {len(dropped)} annotation(s): " + "; ".join(sorted(set(dropped))),
            )
        for attempt in range(CROP_RETRIES):
            policy = self.policies[np.random.randint(len(self.policies))]
            out_image, transforms = self._augment(image, policy)
            instances = self._instances(annos, transforms, out_image.shape[:2])
            # A crop that keeps no instance teaches nothing; draw again (last try keeps whatever came).
            if len(instances) > 0 or len(annos) == 0 or len(self.policies) == 1:
                break
        dataset_dict["image"] = _to_tensor(out_image)
        dataset_dict["instances"] = instances
        return dataset_dict

    def _check_aspect_ratio(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        if max(h, w) > self.max_aspect_ratio * min(h, w):
            raise SkipSample(
                f"aspect ratio {w}x{h} is too extreme: resizing the long side to "
                f"INPUT.MAX_SIZE_{'TRAIN' if self.is_train else 'TEST'} leaves a short side < 1 px"
            )

    def _skip(self, dataset_dict, file_name: str, reason: str):
        """Training: None (MapDataset retries another index). Test: the dict marked with the reason,
        since retrying would evaluate another image twice."""
        self._pending["skipped_images"] += 1
        self._warn_once(file_name, f"skipped: {reason}")
        if self.is_train:
            return None
        dataset_dict.pop("annotations", None)
        dataset_dict[self.SKIP_KEY] = reason
        return dataset_dict

    def _warn_once(self, file_name: str, message: str) -> None:
        if file_name not in self._warned:
            self._warned.add(file_name)
            logger.warning("%s: %s", file_name, message)

    def _augment(self, image, policy):
        aug_input = T.AugInput(image)
        transforms = T.AugmentationList(policy)(aug_input)
        return aug_input.image, transforms

    def _instances(self, annos, transforms, image_shape):
        # transform_instance_annotations rewrites its argument in place; a crop redraw must start
        # again from the untransformed annotation, so it gets a copy.
        annos = [
            utils.transform_instance_annotations(dict(a), transforms, image_shape) for a in annos
        ]
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.mask_format)
        # Keep instances whose clipped box is non-empty even if the mask became empty, as the crop
        # in the released code's train_pipeline does (configs/isda/isda_r50_3x_coco.py).
        return utils.filter_empty_instances(instances, by_box=True, by_mask=False)


def _max_aspect_ratio(policies) -> float:
    """Images longer than this ratio would be resized to a 0-px short side by the smallest
    ResizeShortestEdge.max_size of the policies (the short side is max_size / ratio)."""
    sizes = [
        aug.max_size
        for policy in policies
        for aug in policy
        if isinstance(aug, T.ResizeShortestEdge) and aug.max_size > 0
    ]
    return float(min(sizes)) if sizes else float("inf")


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
