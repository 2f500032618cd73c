"""The export module equals eager inference, and a graph traced at one size is right at others."""

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.engine import DefaultPredictor
from detectron2.export import TracingAdapter

from isda.export import ISDAExportModule, normalised_batch, traceable_attention
from isda.export.verify import compare_detections


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return DefaultPredictor(tiny_cfg())


def _assert_equal_to_instances(outputs, b, instances):
    scores, classes, masks, boxes = (o[b] for o in outputs)
    h, w = instances.image_size
    torch.testing.assert_close(scores, instances.scores, atol=1e-6, rtol=0)
    assert torch.equal(classes, instances.pred_classes)
    assert torch.equal(masks[:, :h, :w], instances.pred_masks)
    assert not masks[:, h:].any() and not masks[:, :, w:].any()  # nothing on the padding
    torch.testing.assert_close(boxes, instances.pred_boxes.tensor, atol=0, rtol=0)


def test_module_equals_default_predictor(predictor):
    # 128 x 160 is a fixed point of the test resize (shortest edge 128), so both see one input.
    image_bgr = np.random.default_rng(1).integers(0, 256, (128, 160, 3), dtype=np.uint8)
    instances = predictor(image_bgr)["instances"]
    rgb = torch.from_numpy(image_bgr[:, :, ::-1].copy()).permute(2, 0, 1).float()
    module = ISDAExportModule(predictor.model)
    with torch.no_grad():
        outputs = module(*normalised_batch(predictor.model, [rgb]))
    assert len(instances) == module.k == outputs[0].shape[1]
    _assert_equal_to_instances(outputs, 0, instances)


def test_module_equals_eager_instances_on_a_padded_batch(predictor):
    model = predictor.model
    images = [torch.rand(3, 128, 160) * 255, torch.rand(3, 80, 112) * 255]
    with torch.no_grad():
        eager = model([{"image": im} for im in images])
        outputs = ISDAExportModule(model)(*normalised_batch(model, images))
    for b, result in enumerate(eager):
        _assert_equal_to_instances(outputs, b, result["instances"])


def test_tracing_adapter_graph_is_right_at_other_sizes(predictor):
    model = predictor.model
    module = ISDAExportModule(model)
    inputs = normalised_batch(model, [torch.rand(3, 128, 160) * 255])
    adapter = TracingAdapter(module, inputs)
    with torch.no_grad(), traceable_attention():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    for h, w in [(160, 128), (96, 128), (192, 256)]:
        images = [torch.rand(3, h, w) * 255, torch.rand(3, h - 32, w - 32) * 255]
        x, sizes = normalised_batch(model, images)
        with torch.no_grad():
            got, want = traced(x, sizes), module(x, sizes)
        result = compare_detections([t.numpy() for t in got], [t.numpy() for t in want])
        assert result["passed"], (h, w, result)
