"""Every YAML in configs/ loads through train_net.setup(), and the model it describes builds."""

import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from conftest import REPO, tiny_cfg, train_net_args
from isda.config import validate_isda_config
from isda.modeling.criterion import SetCriterion, downsample_gt_masks
from isda.modeling.mask_feature_head import MaskFeatureHead
from isda.modeling.mask_head import MaskHead
from isda.modeling.matcher import HungarianMatcher
from isda.modeling.neck import ChannelMapper
from train_net import setup

CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))


def test_configs_folder_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {
        "Base-ISDA.yaml",
        "isda_R_50_12ep.yaml",
        "isda_R_50_24ep.yaml",
        "isda_R_50_42ep.yaml",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_loads_and_its_model_builds(config, tmp_path):
    cfg = setup(
        train_net_args(
            config, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path)
        )
    )
    model = build_model(cfg)
    m = cfg.MODEL.ISDA
    assert len(model.transformer.decoder) == m.DEC_LAYERS
    assert model.query_embedding.weight.shape == (m.NUM_QUERIES, 2 * m.HIDDEN_DIM)
    assert model.mfr_stride == m.MFR_STRIDE
    assert model.transformer_levels == ("p3", "p4", "p5", "p6")[: m.NUM_FEATURE_LEVELS]


@pytest.mark.parametrize(
    "opts,key",
    [
        (["MODEL.ISDA.MFR_STRIDE", 16], "MFR_STRIDE"),
        (["MODEL.ISDA.MFR_COORD", "everywhere"], "MFR_COORD"),
        (["MODEL.ISDA.MASK_LOSS", "bce"], "MASK_LOSS"),
        (["MODEL.ISDA.MASK_BCE_WEIGHT", -1.0], "MASK_BCE_WEIGHT"),
        (["MODEL.ISDA.TWO_STAGE", True], "TWO_STAGE"),
        (["MODEL.ISDA.NHEADS", 5], "HIDDEN_DIM"),
        (["MODEL.ISDA.DEC_LAYERS", 0], "DEC_LAYERS"),
        (["MODEL.ISDA.NUM_FEATURE_LEVELS", 5], "NUM_FEATURE_LEVELS"),
        (["MODEL.ISDA.MSDA_IMPL", "triton"], "MSDA_IMPL"),
        (["SOLVER.AMP.ENABLED", True], "SOLVER.AMP.ENABLED"),
    ],
)
def test_impossible_values_fail_naming_the_key(opts, key):
    with pytest.raises(ValueError, match=key):
        validate_isda_config(tiny_cfg(*opts))


def test_unknown_key_and_wrong_type_fail_at_merge_naming_the_key():
    with pytest.raises(AssertionError, match="MODEL.ISDA.NOT_A_KEY"):
        tiny_cfg("MODEL.ISDA.NOT_A_KEY", 1)
    with pytest.raises(ValueError, match="NUM_QUERIES"):
        tiny_cfg("MODEL.ISDA.NUM_QUERIES", "many")


def test_every_way_of_building_the_model_validates_its_config():
    with pytest.raises(ValueError, match="MODEL.ISDA.MASK_LOSS"):
        DefaultPredictor(tiny_cfg("MODEL.ISDA.MASK_LOSS", "bce"))
    with pytest.raises(ValueError, match="MODEL.ISDA.MFR_COORD"):
        build_model(tiny_cfg("MODEL.ISDA.MFR_COORD", "everywhere"))


PYRAMID = {f"p{i}": ShapeSpec(channels=32, stride=2**i) for i in range(2, 7)}
BACKBONE = {f"res{i}": ShapeSpec(channels=32, stride=2**i) for i in range(2, 6)}


@pytest.mark.parametrize(
    "build,argument",
    [
        (lambda: MaskFeatureHead(PYRAMID, ["p2", "p3"], stride=3), "stride"),
        (lambda: MaskFeatureHead(PYRAMID, ["p2", "p3"], stride=8), "in_features"),
        (lambda: MaskFeatureHead(PYRAMID, ["p2"], coord="everywhere"), "coord"),
        (lambda: ChannelMapper(BACKBONE, ["res2", "res3"], 32, with_p6=True), "in_features"),
        (lambda: MaskHead(8, 2, kernel_dim=6, num_layers=1, ref_encoding="polar"), "ref_encoding"),
        (lambda: SetCriterion(HungarianMatcher(), 2, mask_loss="bce"), "mask_loss"),
        (lambda: downsample_gt_masks(torch.zeros(1, 8, 8), (8, 8), 4, mode="area"), "mode"),
    ],
    ids=["mfr-stride", "mfr-fusion", "mfr-coord", "neck", "mask-head", "criterion", "gt-masks"],
)
def test_layers_reject_bad_arguments_naming_the_argument_not_a_config_key(build, argument):
    with pytest.raises(ValueError, match=argument) as error:
        build()
    assert "MODEL." not in str(error.value)
