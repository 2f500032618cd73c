"""MODEL.ISDA.TEST.DTYPE: inference under bf16 autocast, with sampling locations and
post-processing in fp32, through the model, DefaultPredictor and train_net.py --eval-only."""

import json

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from conftest import TINY_CONFIG, run_train_net, tiny_cfg


def _image(h=96, w=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _record_dtypes(model):
    """Output dtypes of the first backbone conv, the first sampling-offset Linear and the MFR."""
    seen = {}
    parts = {
        "backbone conv": model.backbone.stem.conv1,
        "sampling offsets": model.transformer.encoder[0].self_attn.sampling_offsets,
        "mfr": model.mask_feature_head,
    }
    for name, module in parts.items():
        module.register_forward_hook(lambda m, i, out, n=name: seen.__setitem__(n, out.dtype))
    return seen


def _predict(dtype, state_dict=None):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.ISDA.TEST.DTYPE", dtype)).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    seen = _record_dtypes(model)
    with torch.no_grad():
        out = model([{"image": _image(), "height": 96, "width": 128}])[0]["instances"]
    return model.state_dict(), out, seen


def test_bfloat16_runs_the_network_in_bf16_and_keeps_locations_and_outputs_fp32():
    state, ref, seen32 = _predict("float32")
    _, out, seen16 = _predict("bfloat16", state)
    assert set(seen32.values()) == {torch.float32}
    assert seen16 == {
        "backbone conv": torch.bfloat16,
        "sampling offsets": torch.float32,
        "mfr": torch.bfloat16,
    }
    assert out.scores.dtype == torch.float32 and out.pred_boxes.tensor.dtype == torch.float32
    assert out.pred_masks.dtype == torch.bool and out.pred_masks.shape == ref.pred_masks.shape
    # bf16 keeps 8 bits of mantissa: scores move by about 1%, not more.
    torch.testing.assert_close(
        out.scores.sort().values, ref.scores.sort().values, rtol=0.05, atol=2e-3
    )


@pytest.mark.parametrize(
    "opts, message",
    [
        (
            ("MODEL.ISDA.TEST.DTYPE", "float16"),
            "MODEL.ISDA.TEST.DTYPE='float16' needs MODEL.DEVICE",
        ),
        (("MODEL.ISDA.TEST.DTYPE", "bf16"), "MODEL.ISDA.TEST.DTYPE='bf16' must be one of"),
    ],
)
def test_impossible_dtype_is_rejected_at_startup_naming_the_key(opts, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_cfg(*opts))


def test_default_predictor_honours_the_dtype():
    cfg = tiny_cfg("MODEL.ISDA.TEST.DTYPE", "bfloat16")
    predictor = DefaultPredictor(cfg)
    seen = _record_dtypes(predictor.model)
    image_bgr = _image().permute(1, 2, 0).numpy()[:, :, ::-1].copy()
    out = predictor(image_bgr)["instances"]
    assert seen["backbone conv"] == torch.bfloat16 and seen["sampling offsets"] == torch.float32
    assert out.image_size == image_bgr.shape[:2] and out.scores.dtype == torch.float32
    assert np.isfinite(out.scores.numpy()).all()


def test_eval_only_in_bfloat16_writes_coco_results(tiny_data_root, tmp_path):
    run_train_net(
        "--config-file",
        TINY_CONFIG,
        "--eval-only",
        "MODEL.ISDA.ALLOW_INCOMPLETE_WEIGHTS",  # random weights: the dtype path is under test
        True,
        "MODEL.ISDA.TEST.DTYPE",
        "bfloat16",
        "MODEL.ISDA.NUM_QUERIES",
        10,
        "INPUT.MIN_SIZE_TEST",
        96,
        "OUTPUT_DIR",
        tmp_path,
    )
    results = tmp_path / "inference" / "isda_synth_val" / "coco_instances_results.json"
    dets = json.loads(results.read_text())
    assert dets and {"segmentation", "bbox", "score", "category_id"} <= set(dets[0])
    assert all(np.isfinite(d["score"]) for d in dets)
