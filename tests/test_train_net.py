"""train_net.py end to end, as a user runs it: train + checkpoint, resume, eval-only, 2 CPU processes."""

import json
import re

import pytest

from conftest import TINY_CONFIG, run_train_net

COMMON = ["MODEL.ISDA.NUM_QUERIES", 10, "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", 96]


@pytest.fixture(scope="module")
def trained(tiny_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    proc = run_train_net(
        "--config-file",
        TINY_CONFIG,
        *COMMON,
        "OUTPUT_DIR",
        out,
        "SOLVER.MAX_ITER",
        4,
        "SOLVER.CHECKPOINT_PERIOD",
        2,
    )
    return out, proc


def test_training_writes_checkpoints_and_metrics(trained):
    out, proc = trained
    for name in (
        "model_0000001.pth",
        "model_0000003.pth",
        "model_final.pth",
        "last_checkpoint",
        "metrics.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_mask" in m and "loss_cls_0" in m for m in metrics)
    # Evaluation after training goes through COCOEvaluator (TEST.EVAL_PERIOD 0 still evaluates at the end).
    assert "copypaste: Task: segm" in proc.stdout + proc.stderr


def test_resume_continues_from_the_saved_iteration(trained):
    out, _ = trained
    (out / "last_checkpoint").write_text("model_0000003.pth")
    proc = run_train_net(
        "--config-file",
        TINY_CONFIG,
        "--resume",
        *COMMON,
        "OUTPUT_DIR",
        out,
        "SOLVER.MAX_ITER",
        6,
        "SOLVER.CHECKPOINT_PERIOD",
        100,
    )
    log = proc.stdout + proc.stderr
    assert re.search(r"Starting training from iteration 4\b", log), log[-3000:]
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"


def test_eval_only_loads_weights_and_writes_coco_results(trained, tmp_path):
    out, _ = trained
    proc = run_train_net(
        "--config-file",
        TINY_CONFIG,
        "--eval-only",
        *COMMON,
        "OUTPUT_DIR",
        tmp_path,
        "MODEL.WEIGHTS",
        out / "model_final.pth",
    )
    results = tmp_path / "inference" / "isda_synth_val" / "coco_instances_results.json"
    assert results.is_file()
    dets = json.loads(results.read_text())
    assert dets and {"segmentation", "bbox", "score", "category_id"} <= set(dets[0])
    assert "Loading from" in proc.stdout + proc.stderr


def test_two_cpu_processes_train_with_gloo(tiny_data_root, tmp_path):
    """Also pins what isda.engine.cpu_ddp relies on: DefaultTrainer wraps the model through
    detectron2.engine.defaults.create_ddp_model (DDP rejects device_ids for a CPU model)."""
    proc = run_train_net(
        "--config-file",
        TINY_CONFIG,
        "--num-gpus",
        2,
        *COMMON,
        "OUTPUT_DIR",
        tmp_path,
        "SOLVER.MAX_ITER",
        2,
        "SOLVER.IMS_PER_BATCH",
        2,
        "TEST.EVAL_PERIOD",
        0,
        "DATASETS.TEST",
        "()",
    )
    log = proc.stdout + proc.stderr
    assert "World size: 2" in log
    assert (tmp_path / "model_final.pth").is_file()
