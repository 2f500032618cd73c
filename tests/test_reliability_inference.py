"""Failure behaviour, inference and files: empty outputs, very large inputs, safe checkpoint
loading and config errors at startup (README "Failure behaviour")."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from detectron2.utils.visualizer import Visualizer

from conftest import REPO, TINY_CONFIG, tiny_cfg, train_net_args
from isda.config import MAX_TRANSFORMER_LAYERS
from isda.engine import SafeDetectionCheckpointer
from train_net import Trainer, setup


def test_predictor_returns_valid_empty_instances_when_nothing_is_detected():
    cfg = tiny_cfg("MODEL.ISDA.TEST.SCORE_THRESHOLD", 1.0)  # no score reaches 1: nothing detected
    inst = DefaultPredictor(cfg)(np.zeros((70, 90, 3), np.uint8))["instances"]
    assert len(inst) == 0 and inst.image_size == (70, 90)
    assert inst.pred_masks.shape == (0, 70, 90) and inst.pred_masks.dtype == torch.bool
    assert inst.pred_boxes.tensor.shape == (0, 4)
    assert inst.scores.shape == (0,) and inst.pred_classes.shape == (0,)
    assert instances_to_coco_json(inst, 1) == []  # what COCOEvaluator does with it
    Visualizer(np.zeros((70, 90, 3), np.uint8)).draw_instance_predictions(inst)  # what demo.py does


def test_predictor_resizes_a_very_large_input_per_the_config():
    cfg = tiny_cfg("MODEL.ISDA.TEST.MAX_PER_IMAGE", 2)
    predictor = DefaultPredictor(cfg)
    seen = []
    predictor.model.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    image = np.random.RandomState(0).randint(0, 255, (3000, 4000, 3), dtype=np.uint8)
    inst = predictor(image)["instances"]
    (shape,) = seen
    assert max(shape[-2:]) <= cfg.INPUT.MAX_SIZE_TEST  # 192: the network never sees 4000 px
    assert inst.pred_masks.shape == (len(inst), 3000, 4000) and len(inst) <= 2


def _state_file(path, extra=None):
    model = build_model(tiny_cfg())
    payload = {"model": model.state_dict(), "__author__": "test", "matching_heuristics": False}
    payload.update(extra or {})
    torch.save(payload, path)
    return model


def test_plain_state_dict_files_load_with_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    source = _state_file(path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = build_model(tiny_cfg())
    SafeDetectionCheckpointer(model).load(str(path))
    assert calls == [True]
    key = "query_embedding.weight"
    assert torch.equal(model.state_dict()[key], source.state_dict()[key])


class _Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_files_that_need_pickle_are_refused_unless_trusted(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "code_ran"
    _state_file(path, {"extra": _Payload(str(marker))})
    model = build_model(tiny_cfg())
    with pytest.raises(pickle.UnpicklingError, match="--unsafe-pickle"):
        SafeDetectionCheckpointer(model).load(str(path))
    assert not marker.exists()
    SafeDetectionCheckpointer(model, allow_unsafe_pickle=True).load(str(path))  # opted in
    assert marker.exists()


@pytest.mark.parametrize(
    "opts,key",
    [
        (["MODEL.ISDA.DEC_LAYERS", MAX_TRANSFORMER_LAYERS + 1], "DEC_LAYERS"),
        (["MODEL.ISDA.ENC_LAYERS", 60], "ENC_LAYERS"),
        (["MODEL.ISDA.MFR_STRIDE", 3], "MFR_STRIDE"),
        (["MODEL.ISDA.MFR_STRIDE", 8], "MFR_IN_FEATURES"),  # p2..p5 cannot fuse at 1/8
        (["MODEL.ISDA.MFR_IN_FEATURES", "['p1', 'p2']"], "MFR_IN_FEATURES"),
        (["MODEL.ISDA.FOCAL_ALPHA", 1.5], "FOCAL_ALPHA"),
        (["MODEL.ISDA.TEST.SCORE_THRESHOLD", 2.0], "SCORE_THRESHOLD"),
        (["INPUT.MASK_FORMAT", "polygon"], "INPUT.MASK_FORMAT"),
        (["SOLVER.CHECKPOINT_PERIOD", 0], "SOLVER.CHECKPOINT_PERIOD"),
        (["MODEL.ISDA.NOT_A_KEY", 1], "MODEL.ISDA.NOT_A_KEY"),  # unknown key (Detectron2)
        (["MODEL.ISDA.DEC_LAYERS", 2.5], "MODEL.ISDA.DEC_LAYERS"),  # wrong type (Detectron2)
    ],
)
def test_bad_configs_fail_at_startup_naming_the_key(opts, key, tmp_path):
    # train_net's startup: the config (merge errors), then the model (validation), before any data.
    with pytest.raises((ValueError, AssertionError), match=key.replace(".", r"\.")):
        Trainer.build_model(setup(train_net_args(TINY_CONFIG, *opts, "OUTPUT_DIR", tmp_path)))


def test_deepest_supported_decoder_builds_and_trains():
    """MAX_TRANSFORMER_LAYERS is the depth the tests build and train; deeper is refused."""
    d = MAX_TRANSFORMER_LAYERS
    cfg = tiny_cfg(
        "MODEL.ISDA.DEC_LAYERS", d, "MODEL.ISDA.ENC_LAYERS", d, "MODEL.ISDA.HIDDEN_DIM", 32
    )
    cfg.MODEL.ISDA.NUM_QUERIES, cfg.MODEL.ISDA.DIM_FEEDFORWARD = 5, 32
    model = build_model(cfg).train()
    image = torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)
    inst = Instances((128, 128), gt_classes=torch.tensor([1]))
    inst.gt_masks = BitMasks(
        torch.zeros(1, 128, 128, dtype=torch.bool).index_fill_(1, torch.arange(8, 30), True)
    )
    losses = model([{"image": image, "instances": inst}])
    assert len(losses) == 2 * d and all(torch.isfinite(v) for v in losses.values())


def test_train_net_exits_at_startup_naming_the_bad_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), "--config-file", str(TINY_CONFIG)]
        + ["MODEL.ISDA.DEC_LAYERS", "99", "OUTPUT_DIR", str(tmp_path)],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "MODEL.ISDA.DEC_LAYERS=99 exceeds the supported maximum" in proc.stderr
    assert not list(tmp_path.glob("*.pth"))
