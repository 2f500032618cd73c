"""Training/test data mapper with the DETR augmentation recipe used by ISDA (spec §7).

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
from typing import List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

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
    INPUT.FORMAT and, in training, ``instances`` with gt_classes and gt_masks (BitMasks)."""

    @configurable
    def __init__(
        self, *, is_train: bool, policies, image_format: str = "RGB", mask_format="bitmask"
    ):
        self.is_train, self.policies = is_train, policies
        self.image_format, self.mask_format = image_format, mask_format

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "policies": build_policies(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "mask_format": cfg.INPUT.MASK_FORMAT,
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        if not self.is_train:
            image, _ = self._augment(image, self.policies[0])
            dataset_dict.pop("annotations", None)
            dataset_dict["image"] = _to_tensor(image)
            return dataset_dict
        annos = [a for a in dataset_dict.pop("annotations", []) if a.get("iscrowd", 0) == 0]
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

    def _augment(self, image, policy):
        aug_input = T.AugInput(image)
        transforms = T.AugmentationList(policy)(aug_input)
        return aug_input.image, transforms

    def _instances(self, annos, transforms, image_shape):
        annos = [utils.transform_instance_annotations(a, transforms, image_shape) for a in annos]
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.mask_format)
        # Keep instances whose clipped box is non-empty even if the mask became empty (spec §7).
        return utils.filter_empty_instances(instances, by_box=True, by_mask=False)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
