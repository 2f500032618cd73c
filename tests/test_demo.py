"""The demo pipeline (tools/run_demo.py) and the image demo (demo.py), run for real on tiny sizes."""

import contextlib
import glob
import importlib.util
import io
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor

from isda.data.synthetic import register_synthetic_datasets
from isda.visualization import display_zoom

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO_ROOT, "tools", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_demo = _load_tool("run_demo")

DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "ISDA-Demo.yaml")
# A few iterations on tiny images: the point is the pipeline, not the accuracy.
TINY_OPTS = [
    "SOLVER.MAX_ITER", "4",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "0",
    "TEST.EVAL_PERIOD", "2",
    "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MIN_SIZE_TEST", "96",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.ISDA.DEC_LAYERS", "1",
    "MODEL.ISDA.NUM_QUERIES", "10",
    "SOLVER.CHECKPOINT_PERIOD", "2",  # model_0000001.pth, model_0000003.pth beside model_final.pth
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny demo run: its output folder (relative, as the default output/demo is), dataset
    root, arguments, results and what it printed."""
    root = tmp_path_factory.mktemp("demo")
    out, data = os.path.relpath(root / "out"), str(root / "data")
    argv = [
        "--output-dir", out,
        "--dataset-root", data,
        "--train-size", "6",
        "--val-size", "3",
        "--num-vis", "2",
        "--num-threads", str(torch.get_num_threads()),  # leave the session's setting as it is
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        results = run_demo.main(argv + TINY_OPTS)
    yield out, data, argv, results, printed.getvalue()
    register_synthetic_datasets()  # back to the default root for later tests


def test_demo_writes_model_metrics_curves_and_side_by_side_pngs(demo_run):
    out, _, _, results, _ = demo_run
    assert os.path.isfile(os.path.join(out, run_demo.FINAL_MODEL))
    assert {"bbox", "segm"} <= set(results)
    pngs = sorted(os.listdir(os.path.join(out, "visualizations")))
    assert len(pngs) == 2
    val_images = {os.path.basename(r["file_name"]): r for r in DatasetCatalog.get("isda_synth_val")}
    for name in pngs:
        panel = cv2.imread(os.path.join(out, "visualizations", name))
        h, w = val_images[name]["height"], val_images[name]["width"]
        zoom = display_zoom(h, w)
        assert zoom > 1  # small scenes are upscaled before drawing
        # Ground truth and prediction side by side, each upscaled, with title bars and a legend.
        assert panel is not None and panel.shape[1] > 2 * zoom * w and panel.shape[0] > zoom * h
    assert cv2.imread(os.path.join(out, "training_curves.png")) is not None


def test_metrics_file_has_loss_and_ap_during_training(demo_run):
    entries = run_demo.read_metrics(os.path.join(demo_run[0], "metrics.json"))
    assert any("total_loss" in e for e in entries)
    ap_iters = [e["iteration"] for e in entries if "segm/AP" in e]
    assert len(ap_iters) == 2  # EVAL_PERIOD 2 of MAX_ITER 4


def test_wall_time_counts_the_evaluations_run_inside_training_as_evaluation(demo_run):
    # EVAL_PERIOD 2 of MAX_ITER 4: both evaluations run inside train(), none after it.
    line = next(x for x in demo_run[4].splitlines() if x.startswith("Wall time:"))
    number = r"(\d+\.\d) s"
    found = re.fullmatch(
        rf"Wall time: (\d+) min (\d+) s \(data {number}, training {number}, "
        rf"evaluation {number}, pictures {number}\)",
        line,
    )
    assert found, line
    total = 60 * int(found[1]) + int(found[2])
    data, training, evaluation, pictures = (float(x) for x in found.groups()[2:])
    assert evaluation > 0 and training > 0
    # The phases cover the run; each is rounded to 0.1 s and the total to whole seconds.
    assert abs(data + training + evaluation + pictures - total) <= 0.7


def test_demo_reuses_data_and_finished_model_unless_retrain(demo_run):
    out, data, argv, _, _ = demo_run
    model = os.path.join(out, run_demo.FINAL_MODEL)
    data_json = os.path.join(data, "annotations", "instances_train.json")
    stamps = os.stat(model).st_mtime_ns, os.stat(data_json).st_mtime_ns
    run_demo.main(argv + TINY_OPTS)
    assert (os.stat(model).st_mtime_ns, os.stat(data_json).st_mtime_ns) == stamps
    assert len(glob.glob(os.path.join(out, "model_0*.pth"))) == 2  # periodic checkpoints
    # The retrain leg trains 2 iterations without evaluation or periodic checkpoints.
    retrain_opts = [
        "SOLVER.MAX_ITER",
        "2",
        "TEST.EVAL_PERIOD",
        "0",
        "SOLVER.CHECKPOINT_PERIOD",
        "100",
    ]
    run_demo.main(argv + ["--retrain"] + TINY_OPTS + retrain_opts)
    assert os.stat(model).st_mtime_ns != stamps[0]
    # The old run's checkpoints are gone, although the output folder is a relative path.
    assert [os.path.basename(p) for p in glob.glob(os.path.join(out, "model_*.pth"))] == [
        run_demo.FINAL_MODEL
    ]
    assert os.stat(data_json).st_mtime_ns == stamps[1]
    # A retrain starts a fresh metrics file rather than appending to the old one.
    entries = run_demo.read_metrics(os.path.join(out, "metrics.json"))
    with open(os.path.join(out, "metrics.json")) as f:
        assert len(f.readlines()) == len(entries)


def test_prediction_panel_shows_the_class_names_and_scores_the_model_returned(demo_run, tmp_path):
    out, _, argv, _, _ = demo_run
    cfg = run_demo.build_cfg(run_demo.parse_args(argv + TINY_OPTS))
    # All of the model's top 5 per image are drawn; an untrained model's scores are low.
    cfg.defrost()
    cfg.MODEL.ISDA.TEST.MAX_PER_IMAGE = 5
    drawn = run_demo.write_visualisations(cfg, str(tmp_path), num_images=2, threshold=0.0)
    cfg.MODEL.WEIGHTS = os.path.join(out, run_demo.FINAL_MODEL)
    predictor = DefaultPredictor(cfg)
    names = MetadataCatalog.get("isda_synth_val").thing_classes
    for entry, record in zip(drawn, DatasetCatalog.get("isda_synth_val")):
        assert os.path.isfile(entry["path"])
        instances = predictor(read_image(record["file_name"], format="BGR"))["instances"]
        returned = sorted(
            (names[c], round(100 * s))
            for c, s in zip(instances.pred_classes.tolist(), instances.scores.tolist())
        )
        labels = [re.fullmatch(r"(\w+) (\d+)%", text) for text in entry["prediction"]]
        assert all(labels), entry["prediction"]
        assert len(returned) == 5
        assert sorted((m.group(1), int(m.group(2))) for m in labels) == returned
        assert sorted(entry["ground_truth"]) == sorted(
            names[a["category_id"]] for a in record["annotations"]
        )


def test_ap_table_lists_segm_and_bbox_rows():
    metrics = {k: 12.5 for k in run_demo.COCO_METRICS}
    table = run_demo.format_results({"bbox": metrics, "segm": metrics}, ["isda_synth_val"])
    assert "isda_synth_val segm" in table and "isda_synth_val bbox" in table and "12.5" in table


def test_image_demo_skips_corrupt_files_names_them_and_fails(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("good_a.png", "good_b.jpg"):
        cv2.imwrite(str(images / name), rng.integers(0, 255, (96, 112, 3), dtype=np.uint8))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 300)))
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image; ignored by folder expansion")
    out = tmp_path / "vis"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "demo.py"), "--config-file", DEMO_CONFIG]
    cmd += ["--input", str(images), str(tmp_path / "missing.png"), "--output", str(out)]
    cmd += ["--confidence-threshold", "0.0", "INPUT.MIN_SIZE_TEST", "96"]
    cmd += ["MODEL.ISDA.ALLOW_INCOMPLETE_WEIGHTS", "True"]  # random weights: only files matter here
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert sorted(os.listdir(out)) == ["good_a.png", "good_b.png"]
    failed_line = [line for line in log.splitlines() if "input(s) failed" in line]
    assert len(failed_line) == 1
    for bad in ("corrupt.png", "empty.jpg", "missing.png"):
        assert bad in failed_line[0]
    assert "good_a" not in failed_line[0]
    assert "not a valid image" in log
