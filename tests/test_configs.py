"""Every YAML in configs/ loads through train_net.setup(), and the model it describes builds."""

import pytest
from detectron2.modeling import build_model

from conftest import REPO, tiny_cfg, train_net_args
from isda.config import validate_isda_config
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


@pytest.mark.parametrize(
    "opts,key",
    [
        (["MODEL.ISDA.MFR_STRIDE", 16], "MFR_STRIDE"),
        (["MODEL.ISDA.MFR_COORD", "everywhere"], "MFR_COORD"),
        (["MODEL.ISDA.MASK_LOSS", "bce"], "MASK_LOSS"),
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
