"""COCO evaluation (isda.evaluation): where Detectron2's C++ evaluator is missing, ISDA's evaluator
gives the same numbers as pycocotools' COCOeval on the same predictions, and leaves Detectron2 as
it found it."""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation
from detectron2.structures import Boxes, Instances

from isda.evaluation import ISDACOCOEvaluator, faster_cocoeval


def _predictions(records, seed=0):
    """Per image: the ground-truth masks, some shifted by a few pixels, with random scores and
    classes that are sometimes wrong, plus one false positive: a result with AP between 0 and 1."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        gt = annotations_to_instances(r["annotations"], (r["height"], r["width"]), "bitmask")
        masks = gt.gt_masks.tensor.clone()
        for i in range(len(masks)):
            masks[i] = torch.roll(masks[i], int(rng.integers(-6, 7)), dims=1)
        masks = torch.cat([masks, masks[:1].flip(-1)])
        classes = torch.cat([gt.gt_classes, gt.gt_classes[:1]])
        classes[rng.random(len(classes)) < 0.2] = 0
        inst = Instances((r["height"], r["width"]))
        inst.pred_masks = masks
        inst.pred_classes = classes
        inst.scores = torch.tensor(rng.random(len(masks)), dtype=torch.float32)
        inst.pred_boxes = Boxes(_boxes(masks))
        out.append(({"image_id": r["image_id"]}, {"instances": inst}))
    return out


def _boxes(masks):
    boxes = torch.zeros(len(masks), 4)
    for i, m in enumerate(masks):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs):
            boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return boxes


def _evaluate(evaluator, predictions):
    evaluator.reset()
    for inputs, outputs in predictions:
        evaluator.process([inputs], [outputs])
    return evaluator.evaluate()


def test_isda_evaluator_gives_pycocotools_numbers(tiny_data_root, tmp_path):
    if coco_evaluation.COCOeval_opt is not coco_evaluation.COCOeval:
        pytest.skip("Detectron2's C++ evaluator is present: ISDA's evaluator defers to it")
    predictions = _predictions(DatasetCatalog.get("isda_synth_val"))
    plain = COCOEvaluator("isda_synth_val", output_dir=str(tmp_path / "plain"))
    ours = ISDACOCOEvaluator("isda_synth_val", output_dir=str(tmp_path / "ours"))
    want, got = _evaluate(plain, predictions), _evaluate(ours, predictions)
    assert 0 < want["segm"]["AP"] < 100
    for task in ("segm", "bbox"):
        for key, value in want[task].items():
            assert got[task][key] == pytest.approx(value, abs=0.01, nan_ok=True), (task, key)
    assert coco_evaluation.COCOeval is coco_evaluation.COCOeval_opt  # restored


def test_faster_coco_eval_is_installed_on_the_default_stack():
    if coco_evaluation.COCOeval_opt is not coco_evaluation.COCOeval:
        pytest.skip("the oldest stack evaluates with Detectron2's C++ evaluator")
    assert faster_cocoeval() is not None
