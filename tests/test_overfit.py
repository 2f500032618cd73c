"""Real training: a tiny ISDA learns a handful of generated scenes on CPU, judged by COCOEvaluator."""

import pytest

from conftest import tiny_cfg
from train_net import Trainer


@pytest.mark.slow
def test_tiny_model_overfits_a_few_images_to_segm_ap_50(tiny_data_root, tmp_path):
    cfg = tiny_cfg(
        "OUTPUT_DIR",
        str(tmp_path),
        "SEED",
        0,
        "DATASETS.TEST",
        "()",
        "INPUT.RANDOM_FLIP",
        "none",
        "SOLVER.IMS_PER_BATCH",
        4,
        "SOLVER.BASE_LR",
        0.001,
        "SOLVER.MAX_ITER",
        150,
        "SOLVER.CHECKPOINT_PERIOD",
        1000,
        "TEST.EVAL_PERIOD",
        0,
    )
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    eval_cfg = cfg.clone()
    eval_cfg.defrost()
    eval_cfg.DATASETS.TEST = ("isda_synth_train",)  # the 8 training scenes themselves
    results = Trainer.test(eval_cfg, trainer.model)
    assert results["segm"]["AP"] >= 50, results
    # Boxes come from the masks, so box AP is meaningful too (not ~0 as with all-zero boxes).
    assert results["bbox"]["AP"] >= 30, results
