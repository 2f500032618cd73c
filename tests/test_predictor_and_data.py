"""DefaultPredictor on arbitrary images, and the training data path (augmentation, empty images)."""

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from conftest import tiny_cfg
from isda.data import ISDADatasetMapper


@pytest.fixture(scope="module")
def predictor():
    cfg = tiny_cfg("MODEL.ISDA.TEST.SCORE_THRESHOLD", 0.0)
    cfg.freeze()
    return DefaultPredictor(cfg)


@pytest.mark.parametrize("h,w", [(97, 131), (333, 45), (31, 31)])
def test_predictor_returns_masks_at_the_input_size(predictor, h, w):
    image = np.random.RandomState(0).randint(0, 255, (h, w, 3), dtype=np.uint8)  # BGR
    inst = predictor(image)["instances"]
    assert inst.image_size == (h, w)
    assert inst.pred_masks.shape[1:] == (h, w) and inst.pred_masks.dtype == torch.bool
    assert len(inst.scores) == len(inst.pred_classes) == len(inst.pred_boxes)


def test_predictor_reads_a_grayscale_file(predictor, tmp_path):
    path = str(tmp_path / "gray.png")
    cv2.imwrite(path, np.random.RandomState(1).randint(0, 255, (70, 90), dtype=np.uint8))
    image = utils.read_image(path, format="BGR")  # Detectron2 expands grayscale to 3 channels
    inst = predictor(image)["instances"]
    assert inst.pred_masks.shape[1:] == (70, 90)


def test_training_mapper_applies_crop_policy_and_keeps_instances(tiny_data_root):
    cfg = tiny_cfg(
        "INPUT.CROP.ENABLED",
        True,
        "INPUT.CROP.SIZE",
        (64, 96),
        "INPUT.ISDA.CROP_PRE_RESIZE",
        (128,),
    )
    mapper = ISDADatasetMapper(cfg, is_train=True)
    assert len(mapper.policies) == 2
    record = DatasetCatalog.get("isda_synth_train")[0]
    np.random.seed(0)
    for _ in range(6):
        out = mapper(record)
        image, inst = out["image"], out["instances"]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert len(inst) > 0 and inst.gt_masks.tensor.shape[1:] == image.shape[1:]
        assert min(image.shape[1:]) == 128  # always ends at MIN_SIZE_TRAIN


def test_test_mapper_drops_annotations_and_resizes(tiny_data_root):
    cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", 64)
    out = ISDADatasetMapper(cfg, is_train=False)(DatasetCatalog.get("isda_synth_val")[0])
    assert "annotations" not in out and "instances" not in out and min(out["image"].shape[1:]) == 64


def test_images_without_instances_train_without_error(tiny_data_root):
    cfg = tiny_cfg()
    mapper = ISDADatasetMapper(cfg, is_train=True)
    record = dict(DatasetCatalog.get("isda_synth_train")[0], annotations=[])
    full = mapper(DatasetCatalog.get("isda_synth_train")[1])
    empty = mapper(record)
    assert len(empty["instances"]) == 0
    model = build_model(cfg).train()
    for batch in ([empty], [empty, full]):
        losses = model(batch)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
